"""Shift weights (ShiftAddViT's shift linears, DeepShift-PS's form), fitted post-training.

Every weight is ``s[n] · σ · 2^p``: a sign σ, an integer exponent p in ``[-(L-1), 0]`` (L = 2^(bits-1) - 1
levels) or zero, and one scale per output row that the paper lacks. A kernel then multiplies by no
weight: it adds p to each activation's float exponent (or shifts fixed-point activations) and
accumulates, and the row's sum is scaled once. Code ``c`` (int8): 0 is zero, ``±(1 + j)`` is
``±2^-j``.

Why a row scale: sign x 2^round(log2 |w|) alone (the naive rounding) ties every weight to the
absolute powers of two; a scale per row places the row's largest weights on the top level and
spends the L levels on its range. The fit: the scale from a small grid below the row's maximum
(the one with the least weight error, or output error with a Hessian), then nearest-level rounding,
with GPTQ's error feedback (quant/gptq_rows.py) when a Hessian of the layer's inputs is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .gptq_rows import inverse_factor, prepare

SCALE_STEPS = 8  # candidate scales per row: max|w| x 2^(-t / SCALE_STEPS), t = 0 .. SCALE_STEPS - 1


def levels(bits: int) -> int:
    """Exponent levels L of a ``bits``-bit shift code (one sign bit, one code for zero)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"shift weights: bits must be 2..8, got {bits}")
    return 2 ** (bits - 1) - 1


@dataclass
class ShiftWeight:
    """``W[n, k] ≈ scale[n] · sign(code) · 2^-(|code| - 1)``, code 0 = 0."""

    codes: np.ndarray  # int8 [N, K]
    scale: np.ndarray  # float32 [N]

    def dequantize(self) -> np.ndarray:
        c = self.codes.astype(np.int32)
        mag = np.where(c != 0, np.ldexp(np.float32(1), 1 - np.abs(c)), 0).astype(np.float32)
        return (np.sign(c).astype(np.float32) * mag) * self.scale[:, None]


def nearest(x: torch.Tensor, lv: int) -> torch.Tensor:
    """Codes of the levels nearest to ``x`` (in units of the row scale; the levels are 0, ±2^-j for
    j < lv): between 2^(e-1) and 2^e the midpoint 0.75 · 2^e decides; below half the smallest level, 0."""
    a = x.abs()
    e = torch.floor(torch.log2(torch.clamp(a, min=2.0 ** (-lv - 1))))  # 2^e <= a < 2^(e+1)
    e = e + (a >= 1.5 * torch.exp2(e)).to(e.dtype)  # nearer to 2^(e+1)
    j = torch.clamp(-e, 0, lv - 1)  # level 2^-j
    code = torch.where(a < 0.5 * 2.0 ** (1 - lv), torch.zeros_like(j), j + 1)
    return (torch.sign(x) * code).to(torch.int8)


def value(code: torch.Tensor) -> torch.Tensor:
    c = code.to(torch.float64)
    return torch.sign(c) * torch.where(c != 0, torch.exp2(1 - c.abs()), torch.zeros_like(c))


def _scales(W: torch.Tensor, lv: int, H: torch.Tensor | None) -> torch.Tensor:
    """Per row, the candidate scale with the least error of nearest rounding (weighted by diag(H))."""
    top = W.abs().amax(1).clamp(min=1e-30)  # [N]
    wts = torch.ones(W.shape[1], dtype=W.dtype) if H is None else torch.diagonal(H)
    best, best_err = top.clone(), torch.full_like(top, float("inf"))
    for t in range(SCALE_STEPS):
        s = top * 2.0 ** (-t / SCALE_STEPS)
        q = value(nearest(W / s[:, None], lv)) * s[:, None]
        err = ((W - q) ** 2 * wts).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def fit_shift(w: np.ndarray, bits: int = 4, hessian: np.ndarray | None = None, damp: float = 0.01) -> ShiftWeight:
    """Shift weights for ``w`` [N, K]: nearest levels under a fitted row scale; with ``hessian``
    [K, K] (of the layer's inputs) GPTQ's column loop pushes each column's error onto the columns
    not yet coded, so the output error ‖(W - Ŵ) X‖, not the weight error, is what shrinks."""
    lv = levels(bits)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"shift weights: expected a 2-d [N, K] weight, got shape {w.shape}")
    if hessian is None:
        W = torch.from_numpy(w.astype(np.float64))
        s = _scales(W, lv, None)
        return ShiftWeight(nearest(W / s[:, None], lv).numpy(), s.to(torch.float32).numpy())
    W, H = prepare(w, hessian, damp)
    s = _scales(W, lv, H)
    U = inverse_factor(H)
    W = W.clone()
    codes = torch.empty(W.shape, dtype=torch.int8)
    for c in range(W.shape[1]):  # GPTQ's loop in column order (rows at once)
        code = nearest(W[:, c] / s, lv)
        codes[:, c] = code
        e = (W[:, c] - value(code) * s) / U[c, c]
        W[:, c + 1 :] -= e[:, None] * U[c, c + 1 :][None, :]
    return ShiftWeight(codes.numpy(), s.to(torch.float32).numpy())
