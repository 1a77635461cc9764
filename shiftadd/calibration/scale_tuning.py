"""End-to-end tuning of the fitted scales against the float model's outputs (codes fixed).

The layer-wise fit (error feedback + refits) minimises each matmul's own output error; errors of
many layers then add up through the network. With the binary codes frozen, every scale and offset
is a continuous parameter of the whole model, so a few passes of gradient descent on the KL
divergence between the float model's next-token distribution and the quantized one's (knowledge
distillation on the calibration text) let the scales of one layer compensate the errors of others.
Scales stay APoT values: the forward pass rounds them (``rnd``, the storage format's rounding) with a
straight-through gradient, so what is tuned is exactly what is stored and the kernel is unchanged.
The gains of the normalisation layers (float, free at inference) are tuned with them.

Parametrisation: ``α = α₀·exp(s)`` (scales keep their sign and move in relative steps, so one learning
rate fits layers whose scales differ by orders of magnitude), ``z = z₀ + α₀[0]·t`` for offsets, and
``γ = γ₀·exp(v)`` for norm gains; ``s, t, v`` start at 0, i.e. at the layer-wise fit. Measured on
SmolLM2-135M at 3 bits (docs/QUALITY.md). Needs the source model (torch): Hugging Face inputs only.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from ..quant.bcq import BCQWeight

logger = logging.getLogger(__name__)

KL_PROBE_WINDOWS = 16  # windows the before/after KL is reported on


@dataclass
class TunedScales:
    """What tuning returns: the fits with tuned (rounded) scales, the tuned norm gains by parameter
    name, and the KL divergence on the calibration windows before and after (mean per token)."""

    fitted: dict
    norms: dict
    kl_before: float
    kl_after: float
    seconds: float


def _linear_modules(model):
    """``{weight name: (module, transposed)}`` for nn.Linear-like modules; GPT-2's Conv1D stores [K, N]."""
    import torch

    out = {}
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.nn.Parameter) and w.ndim == 2 and not isinstance(m, torch.nn.Embedding):
            out[f"{n}.weight"] = (m, type(m).__name__ == "Conv1D")
    return out


def _norm_gains(model, available) -> dict:
    """Norm-layer gains (LayerNorm / RMSNorm weights) whose parameter name is in ``available`` and whose
    value no other norm shares: an exporter may merge equal initializers (e.g. freshly initialised
    all-ones gains), and tuning one of them would then silently change the others in the graph."""
    gains = {
        f"{n}.weight": m.weight
        for n, m in model.named_modules()
        if type(m).__name__.endswith("Norm") and getattr(m, "weight", None) is not None
    }
    keyed = {}
    for name, p in gains.items():
        keyed.setdefault(p.detach().numpy().tobytes(), []).append(name)
    unique = {names[0] for names in keyed.values() if len(names) == 1}
    return {n: p for n, p in gains.items() if n in unique and n in available}


class _Scales:
    """One row-group fit as differentiable scales: ``W = z + Σ_b α_b B_b`` rebuilt every step."""

    def __init__(self, bw: BCQWeight, transposed: bool):
        import torch

        q, n, k = bw.signs.shape
        g = bw.group
        ng = bw.alpha.shape[2]
        b = np.zeros((q, n, ng * g), np.float32)
        b[:, :, :k] = np.where(bw.signs, 1.0, -1.0)
        self.bw, self.k, self.transposed = bw, k, transposed
        self.B = torch.from_numpy(b.reshape(q, n, ng, g))
        self.a0 = torch.from_numpy(np.asarray(bw.alpha, np.float32))
        # tied scales (quant.bcq.plane_weights) move together: one log-step per (row, group) keeps them tied
        self.s = torch.zeros_like(self.a0[:1] if bw.tied else self.a0, requires_grad=True)
        self.z0 = torch.from_numpy(np.asarray(bw.offset, np.float32)) if bw.offset is not None else None
        self.t = torch.zeros_like(self.z0, requires_grad=True) if self.z0 is not None else None

    def params(self):
        return [self.s] + ([self.t] if self.t is not None else [])

    def scales(self, rnd, hard: bool):
        import torch

        a = self.a0 * torch.exp(self.s)
        z = self.z0 + self.a0[0] * self.t if self.z0 is not None else None
        if hard:  # straight-through: the forward pass sees the stored (rounded) values
            if self.bw.tied:  # round plane 0's scale, the others are it times 2^-b
                from ..quant.bcq import plane_weights

                stored = rnd(a[:1].detach()).to(a.dtype) * plane_weights(a.shape[0])[:, None, None]
            else:
                stored = rnd(a.detach()).to(a.dtype)
            a = a + (stored - a).detach()
            if z is not None:
                z = z + (rnd(z.detach()).to(z.dtype) - z).detach()
        return a, z

    def weight(self, rnd, hard: bool = True):
        import torch

        a, z = self.scales(rnd, hard)
        w = torch.einsum("bng,bnge->nge", a, self.B)
        if z is not None:
            w = w + z[..., None]
        w = w.reshape(w.shape[0], -1)[:, : self.k]
        return w.T if self.transposed else w

    def tuned(self, rnd) -> BCQWeight:
        import torch

        with torch.no_grad():
            a, z = self.scales(rnd, hard=True)
        return BCQWeight(
            signs=self.bw.signs,
            alpha=a.numpy().astype(np.float32),
            group=self.bw.group,
            offset=z.numpy().astype(np.float32) if z is not None else None,
            tied=self.bw.tied,
        )


def tune_scales(
    model,
    fitted: dict,
    windows: np.ndarray,
    rnd,
    steps: int,
    lr: float = 1.5e-3,
    batch: int = 2,
    norms: bool = True,
    available=None,
    seed: int = 0,
) -> TunedScales:
    """Tune the scales of ``fitted`` (weight name -> BCQWeight of the row-group layout; other fits stay
    as they are) and the norm gains of ``model`` (a torch causal LM holding the float weights) for
    ``steps`` Adam steps (cosine-decayed ``lr``) of ``batch`` rows of ``windows`` (int token ids
    [count, length]) each, minimising KL(float || quantized) of the next-token distributions.
    ``available``: parameter names the compiled graph has (norm gains outside it are not tuned)."""
    import torch
    from tqdm import tqdm

    windows = np.asarray(windows)
    if steps < 1:
        raise ValueError(f"scale tuning: steps must be >= 1, got {steps}")
    if not lr > 0 or batch < 1:
        raise ValueError(f"scale tuning: lr > 0 and batch >= 1 expected, got lr={lr}, batch={batch}")
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2 or windows.dtype.kind not in "iu":
        raise ValueError(
            "scale tuning: calibration windows must be integer token ids [count >= 1, length >= 2], "
            f"got {windows.dtype} {list(windows.shape)}"
        )
    mods = _linear_modules(model)
    layers = {
        name: _Scales(bw, mods[name][1])
        for name, bw in fitted.items()
        if isinstance(bw, BCQWeight) and bw.alpha_rows == 1 and name in mods
    }
    if not layers:
        raise ValueError(
            "scale tuning: none of the fitted matmuls is a row-group fit of one of the model's "
            f"linear layers (fitted: {sorted(fitted)[:3]}..., model: {sorted(mods)[:3]}...)"
        )
    fixed = {}  # other fits: their dequantized weights, constant
    for name, bw in fitted.items():
        if name not in layers and name in mods:
            w = torch.from_numpy(np.asarray(bw.dequantize(), np.float32))
            fixed[name] = w.T if mods[name][1] else w
    names = set(available) if available is not None else {n for n, _ in model.named_parameters()}
    gains = _norm_gains(model, names) if norms else {}
    g0 = {n: p.detach().clone() for n, p in gains.items()}
    gv = {n: torch.zeros_like(p, requires_grad=True) for n, p in gains.items()}
    params = [p for s in layers.values() for p in s.params()] + list(gv.values())
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()

    def weights(hard=True):
        out = dict(fixed)
        out.update({n: s.weight(rnd, hard) for n, s in layers.items()})
        out.update({n: g0[n] * torch.exp(v) for n, v in gv.items()})
        return out

    def kl(x, w):
        with torch.no_grad():
            t = torch.log_softmax(model(input_ids=x).logits.float(), -1)
        s = torch.log_softmax(torch.func.functional_call(model, w, (), {"input_ids": x}).logits.float(), -1)
        return (t.exp() * (t - s)).sum(-1).mean()

    probe = windows[:KL_PROBE_WINDOWS]

    def mean_kl():  # on the first windows only: a progress figure, not worth a full pass
        with torch.no_grad():
            w = weights()
            return float(
                np.mean(
                    [kl(torch.from_numpy(probe[i : i + batch]).long(), w).item() for i in range(0, len(probe), batch)]
                )
            )

    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(windows)) for _ in range(-(-steps * batch // len(windows)))])
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    t0 = time.time()
    try:
        before = mean_kl()
        bar = tqdm(
            range(steps),
            desc="scale tuning (KL to float)",
            unit="step",
            disable=not logger.isEnabledFor(logging.INFO),
            leave=False,
        )
        for i in bar:
            x = torch.from_numpy(windows[order[i * batch : (i + 1) * batch]]).long()
            loss = kl(x, weights())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(kl=f"{loss.item():.4f}")
        after = mean_kl()
    finally:
        for p, g in frozen:
            p.requires_grad_(g)
        model.train(was_training)
    tuned = dict(fitted)
    tuned.update({n: s.tuned(rnd) for n, s in layers.items()})
    with torch.no_grad():
        new_gains = {n: (g0[n] * torch.exp(v)).numpy().astype(np.float32) for n, v in gv.items()}
    secs = time.time() - t0
    logger.info(
        f"scale tuning: {len(layers)} matmuls, {len(new_gains)} norm gains, {steps} steps of {batch} windows: "
        f"KL to float {before:.4f} -> {after:.4f} per token in {secs:.1f}s"
    )
    return TunedScales(tuned, new_gains, before, after, secs)
