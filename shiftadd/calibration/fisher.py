"""Loss sensitivity of every linear layer's outputs (empirical Fisher), for loss-aware bit allocation.

The allocator's output error ``tr(ΔW H ΔWᵀ)`` counts an error in every output channel of every layer
the same, though an error in a late ``down_proj`` moves the loss far more than the same error in an
early ``v_proj``. With ``F_i = E_t[(∂L/∂y_{t,i})²]`` (the diagonal empirical Fisher of the layer's
outputs ``y = W x``) the second-order estimate of the loss increase from ``ΔW``, assuming the
gradient and the input are uncorrelated, is ``½ Σ_i F_i (ΔW H ΔWᵀ)_ii``: the per-row output errors
weighted by ``F`` (quant/allocate.py ``output_error(..., fisher=F)``). Gradients need the source
model, so this runs on Hugging Face (torch) models; an ONNX input keeps the plain output error.
"""

from __future__ import annotations

import logging
import time

import numpy as np

logger = logging.getLogger(__name__)


def output_fisher(model, batches: list[dict], names=None) -> dict[str, np.ndarray]:
    """``{weight name: F [outputs]}`` for the linear modules (2-D ``weight``: ``nn.Linear``, GPT-2's
    ``Conv1D``) of ``model`` (a causal LM) whose weight names (``<module>.weight``) are in ``names``
    (all when None): the mean over the tokens of ``batches`` (``{"input_ids": [1, L] ints}``) of
    the squared gradient of the next-token loss (summed over tokens) with respect to each output."""
    import torch
    from tqdm import tqdm

    if not batches:
        raise ValueError("Fisher estimate: no calibration batches")
    lin = {
        f"{n}.weight": m
        for n, m in model.named_modules()  # nn.Linear, GPT-2's Conv1D, ...
        if isinstance(getattr(m, "weight", None), torch.nn.Parameter)
        and m.weight.ndim == 2
        and not isinstance(m, torch.nn.Embedding)
    }
    if names is not None:
        names = set(names)
        lin = {k: m for k, m in lin.items() if k in names}
    if not lin:
        raise ValueError(
            f"Fisher estimate: the model has no linear layers named {sorted(names)[:3] if names else []}..."
        )
    acc = {}

    def on_output(name):
        def record(g):  # returns None: the gradient itself flows on unchanged
            sq = g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0)
            acc[name] = acc[name] + sq if name in acc else sq

        def hook(_mod, _inp, out):
            out.register_hook(record)

        return hook

    def grad_from_here(_mod, _inp, out):  # the weights stay frozen; gradients flow from the embeddings on
        return out.requires_grad_(True)

    hooks = [m.register_forward_hook(on_output(k)) for k, m in lin.items()]
    hooks.append(model.get_input_embeddings().register_forward_hook(grad_from_here))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    t0, tokens = time.time(), 0
    try:
        for b in tqdm(
            batches,
            desc="loss sensitivity (Fisher)",
            unit="window",
            disable=not logger.isEnabledFor(logging.INFO),
            leave=False,
        ):
            ids = torch.as_tensor(np.asarray(b["input_ids"]), dtype=torch.long)
            if ids.ndim != 2 or ids.shape[1] < 2:
                raise ValueError(f"Fisher estimate: input_ids of shape [batch, >= 2] expected, got {list(ids.shape)}")
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
            )
            loss.backward()
            tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
        for p, g in frozen:
            p.requires_grad_(g)
    logger.info(f"loss sensitivity of {len(acc)} linear layers from {tokens} tokens in {time.time() - t0:.1f}s")
    return {k: (v / tokens).numpy() for k, v in acc.items()}
