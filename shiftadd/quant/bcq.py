"""Binary-coding quantization (BCQ) with power-of-two scales, fitted by alternating refinement.

``W[n, :] ≈ Σ_b α[b, n, g] · B[b, n, :]`` with ``B ∈ {-1, +1}`` and one APoT scale per
(plane b, output row n, group g of ``group`` consecutive inputs): the row-wise group layout of
method.md §1, which a CPU LUT kernel consumes directly. The fit is method.md §2: greedy init, then
rounds of least-squares α, APoT rounding, and the optimal B for the rounded α (nearest of the 2^q
codewords ``Σ ±α_b``, by binary search over sorted midpoints). Everything is batched over all groups
of a matrix in torch, so a 135M-parameter model quantizes in seconds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .apot import apot_round

SUPPORTED_BITS = (2, 3, 4)
MU = 4  # inputs per look-up table on CPU (16-entry tables); a scale group is made of whole tables


@dataclass(frozen=True)
class BCQConfig:
    """How a weight matrix is reparameterized. ``group=-1`` means one group per output row."""

    bits: int = 3
    group: int = 128
    apot_terms: int = 3
    rounds: int = 6

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.group != -1 and (self.group <= 0 or self.group % MU):
            raise ValueError(
                f"group size must be a positive multiple of {MU} (whole {MU}-input look-up tables) "
                f"or -1 for one group per row, got {self.group!r}"
            )
        if not 1 <= self.apot_terms <= 8:
            raise ValueError(f"apot_terms must be in 1..8, got {self.apot_terms!r}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds!r}")

    def group_for(self, k: int) -> int:
        """Effective group size for ``k`` inputs: a multiple of MU, at most ``k`` rounded up to MU."""
        kp = -(-k // MU) * MU
        return kp if self.group == -1 else min(self.group, kp)


@dataclass
class BCQWeight:
    """A fitted matrix. ``signs[b, n, k]`` is True for +1; ``alpha[b, n, g]`` are APoT values.

    The last group may be shorter than ``group`` when ``group`` does not divide ``k``.
    """

    signs: np.ndarray  # bool [q, N, K]
    alpha: np.ndarray  # float32 [q, N, NG]
    group: int

    @property
    def bits(self) -> int:
        return self.signs.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.signs.shape[1], self.signs.shape[2]

    def dequantize(self) -> np.ndarray:
        """``Σ_b α_b ⊙ B_b`` as float32 [N, K], the matrix the kernel multiplies by."""
        q, n, k = self.signs.shape
        a = np.repeat(self.alpha, self.group, axis=2)[:, :, :k].astype(np.float32)
        b = np.where(self.signs, np.float32(1), np.float32(-1))
        return (a * b).sum(axis=0, dtype=np.float32)


def _sign_patterns(q: int) -> torch.Tensor:
    """All 2^q sign vectors, shape [2^q, q]."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=q)), dtype=torch.float32)


def _best_codes(v: torch.Tensor, alpha: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Optimal B (±1, [R, q, G]) for fixed α ([R, q]): nearest codeword Σ ±α_b for every element,
    by binary search of the element among the sorted midpoints of the 2^q candidates of its group."""
    q = alpha.shape[1]
    cand = alpha @ patterns.T  # [R, 2^q]
    cand, order = torch.sort(cand, dim=1)
    mids = 0.5 * (cand[:, 1:] + cand[:, :-1]).contiguous()
    rank = torch.searchsorted(mids, v)  # [R, G] in [0, 2^q)
    pat = torch.gather(order, 1, rank)
    shifts = torch.arange(q - 1, -1, -1, dtype=pat.dtype).view(1, q, 1)
    return ((pat.unsqueeze(1) >> shifts) & 1).to(torch.float32) * 2 - 1  # pattern bit b is plane b


def _fit_groups(v: torch.Tensor, q: int, rounds: int, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit α [R, q] (APoT, sorted by magnitude) and B [R, q, G] to the rows of v [R, G]."""
    r = v.clone()
    bs, als = [], []
    for _ in range(q):  # greedy init
        b = torch.where(r >= 0, 1.0, -1.0)
        a = r.abs().mean(dim=1)
        r -= a[:, None] * b
        bs.append(b)
        als.append(a)
    b = torch.stack(bs, 1)
    alpha = apot_round(torch.stack(als, 1), terms).to(torch.float32)
    patterns = _sign_patterns(q)
    b = _best_codes(v, alpha, patterns)
    best_err = ((torch.einsum("rq,rqg->rg", alpha, b) - v) ** 2).sum(1)
    best_a, best_b = alpha, b
    eye = torch.eye(q, dtype=torch.float64) * 1e-9
    for _ in range(rounds):
        bd = b.to(torch.float64)
        gram = bd @ bd.transpose(1, 2) + eye  # [R, q, q]
        rhs = torch.einsum("rqg,rg->rq", bd, v.to(torch.float64))
        a = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)
        a = torch.nan_to_num(a).abs()
        a, _ = torch.sort(a, dim=1, descending=True)
        alpha = apot_round(a, terms).to(torch.float32)
        b = _best_codes(v, alpha, patterns)
        err = ((torch.einsum("rq,rqg->rg", alpha, b) - v) ** 2).sum(1)
        better = err < best_err
        if not bool(better.any()):
            break
        best_err = torch.where(better, err, best_err)
        best_a = torch.where(better[:, None], alpha, best_a)
        best_b = torch.where(better[:, None, None], b, best_b)
        alpha, b = best_a, best_b
    return best_a, best_b


def quantize_matrix(w: np.ndarray | torch.Tensor, cfg: BCQConfig) -> BCQWeight:
    """Fit BCQ planes and APoT scales to ``w`` ([N outputs, K inputs]) minimising the weight error."""
    w = torch.as_tensor(np.asarray(w, dtype=np.float32) if not isinstance(w, torch.Tensor) else w)
    w = w.detach().to(torch.float32)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"expected a non-empty 2-D weight matrix [N, K], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight matrix contains NaN or Inf")
    n, k = w.shape
    g = cfg.group_for(k)
    q = cfg.bits
    ng = -(-k // g)
    signs = torch.empty((q, n, k), dtype=torch.bool)
    alpha = torch.empty((q, n, ng), dtype=torch.float32)
    full = k // g
    with torch.no_grad():
        if full:
            v = w[:, : full * g].reshape(n * full, g)
            a, b = _fit_groups(v, q, cfg.rounds, cfg.apot_terms)
            alpha[:, :, :full] = a.reshape(n, full, q).permute(2, 0, 1)
            signs[:, :, : full * g] = (b > 0).reshape(n, full, q, g).permute(2, 0, 1, 3).reshape(q, n, full * g)
        if full * g < k:  # ragged last group
            v = w[:, full * g :].contiguous()
            a, b = _fit_groups(v, q, cfg.rounds, cfg.apot_terms)
            alpha[:, :, full] = a.T
            signs[:, :, full * g :] = (b > 0).permute(1, 0, 2)
    return BCQWeight(signs=signs.numpy(), alpha=alpha.numpy(), group=g)
