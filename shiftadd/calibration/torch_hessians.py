"""One-pass Hessians measured on the source model in torch, with hooks on its linear layers.

Why: the Relax capture (calibration/hessians.py) runs our float TVM build of the model once per
calibration window, with every matmul input as an extra output copied to numpy. For a Hugging Face
input the same inputs are one forward pass of the torch model away, batched over windows, with the
products ``xᵀx`` accumulated inside the hooks. The Relax capture stays for ONNX-only inputs and for
any weight this cannot find.

A weight is found when the model has a module named like it (``model.layers.0.mlp.up_proj`` for
``model.layers.0.mlp.up_proj.weight``) that is a ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2):
both multiply their input's last axis by that weight, which is what the captured matmul sees.
"""

from __future__ import annotations

import logging
import time

import numpy as np

logger = logging.getLogger(__name__)

BATCH = 8  # windows per forward pass


class _Stop(Exception):
    """Raised by the output layer's hook: the rest of the forward pass is not needed."""


def _linear_modules(model, layers) -> dict | None:
    """``{weight name: module}`` for every (name, w [N, K]) of ``layers``, or None if any has no
    linear module holding exactly that weight. A module is named like the weight, or like its tail
    (exports may drop a leading ``model.``)."""
    import torch
    from torch import nn

    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    found = {}
    for name, w in layers:
        base = name.removesuffix(".weight")
        if base == name:
            return None
        hits = [m for n, m in modules if n == base or n.endswith("." + base) or base.endswith("." + n)]
        if len(hits) != 1:
            return None
        mod = hits[0]
        weight = mod.weight.detach()
        weight = weight if isinstance(mod, nn.Linear) else weight.T  # Conv1D stores [K, N]
        if tuple(weight.shape) != tuple(np.shape(w)) or not torch.equal(
            weight[:2].to(torch.float32), torch.from_numpy(np.asarray(w[:2], np.float32))
        ):
            return None
        found[name] = mod
    return found


def hessians_from_torch(model, batches: list[dict], layers) -> tuple[dict, int, int, float] | None:
    """({name: H [K, K] float64}, tokens, forward passes, seconds) over ``batches`` (feeds of
    ``input_ids`` / ``attention_mask``) for ``layers`` (name, weight [N, K]), or None when a weight
    is not one of ``model``'s linear modules."""
    import torch

    names = [name for name, _ in layers]
    modules = _linear_modules(model, layers)
    if modules is None or not batches or any(set(f) - {"input_ids", "attention_mask"} for f in batches):
        return None
    t0 = time.time()
    sums, rows, hooks, seen = {}, {}, [], {}  # seen: the last input and its product
    share: dict[str, str] = {}  # name -> the name whose sum it reads (Q/K/V, gate/up: one input)
    by_module = {}
    for name, mod in modules.items():
        by_module.setdefault(id(mod), (mod, []))[1].append(name)
    last = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def hook(mod, names_here):
        def run(_mod, args):
            x = args[0]
            if seen.get("x") is not x:  # Q/K/V (gate/up) are called on one tensor: one product
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                seen.update(x=x, xtx=x2.T @ x2, n=x2.shape[0])
                seen.pop("first", None)
            xtx, n = seen["xtx"], seen["n"]
            for name in names_here:  # names fed by one tensor share one sum (the first name's)
                key = share.setdefault(name, seen.setdefault("first", name))
                if key == name:
                    sums[name] = sums[name].add_(xtx) if name in sums else xtx.clone()
                rows[name] = rows.get(name, 0) + n
            if mod is last:  # the output layer's input is all it is needed for: skip its matmul
                raise _Stop

        return run

    for mod, names_here in by_module.values():
        hooks.append(mod.register_forward_pre_hook(hook(mod, names_here)))
    forwards = 0
    from tqdm import tqdm

    bar = tqdm(
        total=len(batches),
        desc="calibration (torch)",
        unit="window",
        leave=False,
        disable=not logger.isEnabledFor(logging.INFO),
    )
    try:
        with torch.no_grad():
            for i in range(0, len(batches), BATCH):
                chunk = batches[i : i + BATCH]
                groups = [chunk] if len({np.shape(f["input_ids"]) for f in chunk}) == 1 else [[f] for f in chunk]
                for g in groups:  # ragged windows one at a time
                    feed = {k: torch.from_numpy(np.concatenate([np.asarray(f[k]) for f in g])) for k in g[0]}
                    try:
                        model(**feed, use_cache=False)
                    except _Stop:
                        pass
                    seen.clear()
                    forwards += 1
                    bar.update(len(g))
    finally:
        bar.close()
        for h in hooks:
            h.remove()
    tokens = max(rows.values()) if rows else 0
    if not tokens or any(rows.get(n) != tokens for n in names):  # a layer the forward did not reach
        return None
    means = {key: (sums[key] / rows[key]).numpy() for key in set(share.values())}
    hessians = {n: means[share[n]] for n in names}  # shared inputs: one array (fits join their rows)
    return hessians, tokens, forwards, time.time() - t0
