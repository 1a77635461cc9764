"""Binary-coding quantization (BCQ) with power-of-two scales, fitted by alternating refinement.

``W[n, :] ≈ Σ_b α[b, n, g] · B[b, n, :]`` with ``B ∈ {-1, +1}`` and one APoT scale per
(plane b, output row n, group g of ``group`` consecutive inputs): the row-wise group layout of
method.md §1, which a CPU LUT kernel consumes directly. The fit is method.md §2: an init, then
rounds of least-squares α, APoT rounding, and the optimal B for the rounded α (nearest of the 2^q
codewords ``Σ ±α_b``, by binary search over sorted midpoints). Everything is batched over all groups
of a matrix in torch.

With ``offset`` (default) a per-group offset z joins the fit (``W ≈ z + Σ α_b B_b``, LUT-GEMM's
form) and the init is the uniform grid of asymmetric round-to-nearest with a level at exactly 0.
That is the default because the authors' symmetric codebook without a level at 0 turns the many
near-zero weights of outlier-heavy groups into ±step/2 noise (perplexities: docs/ENGINEERING.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .apot import SCALE_FORMATS, scale_rounder

SUPPORTED_BITS = (2, 3, 4)
LAYOUTS = ("row-group", "block", "column")  # method.md §1; see quant/gptq.py
CHUNK_WEIGHTS = 1 << 18  # weights fitted at once by quantize_matrix
MU = 4  # inputs per look-up table on CPU (16-entry tables); a scale group is made of whole tables


@dataclass(frozen=True)
class BCQConfig:
    """How a weight matrix is reparameterized. ``group=-1`` means one group per output row."""

    bits: int = 3
    group: int = 64
    apot_terms: int = 3
    rounds: int = 6
    offset: bool = True  # per-group APoT offset z (LUT-GEMM's bias term): W ≈ z + Σ α_b B_b
    layout: str = "row-group"  # scale layout: row-group | block (8 inputs x block_rows rows) | column
    block_rows: int = 64  # rows sharing a scale in the block layout
    scale_format: str = "fp16"  # fp16: APoT (apot_terms terms), 2 bytes | e5m2: float8 e5m2 (APoT, 1 byte)
    refits: int = 3  # with calibration, row-group: codebook refits against H alternated with the loop (quant/refit.py)
    tied: bool = False  # row-group: plane b's scale is α·2^-b, one stored scale per group (see plane_weights)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {self.block_rows!r}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.group != -1 and (self.group <= 0 or self.group % MU):
            raise ValueError(
                f"group size must be a positive multiple of {MU} (whole {MU}-input look-up tables) "
                f"or -1 for one group per row, got {self.group!r}"
            )
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {self.scale_format!r}")
        if not 1 <= self.apot_terms <= 8:
            raise ValueError(f"apot_terms must be in 1..8, got {self.apot_terms!r}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds!r}")
        if self.refits < 0:
            raise ValueError(f"refits must be >= 0, got {self.refits!r}")
        if self.tied and self.layout != "row-group":
            raise ValueError(
                f"tied scales are a row-group layout (one scale per row and group), got layout {self.layout!r}"
            )

    def rounder(self):
        """Rounding of scales and offsets for the storage format (quant.apot.scale_rounder)."""
        return scale_rounder(self.scale_format, self.apot_terms)

    def group_for(self, k: int) -> int:
        """Effective group size for ``k`` inputs: a multiple of MU, at most ``k`` rounded up to MU."""
        kp = -(-k // MU) * MU
        return kp if self.group == -1 else min(self.group, kp)


class SignPlanes:
    """What every fitted form shares: sign planes ``signs`` [q, N, K] (True = +1)."""

    signs: np.ndarray

    @property
    def bits(self) -> int:
        return self.signs.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.signs.shape[1], self.signs.shape[2]


@dataclass
class BCQWeight(SignPlanes):
    """A fitted matrix. ``signs[b, n, k]`` is True for +1; ``alpha[b, n, g]`` are APoT values.

    The last group may be shorter than ``group`` when ``group`` does not divide ``k``.
    """

    signs: np.ndarray  # bool [q, N, K]
    alpha: np.ndarray  # float32 [q, N, NG]
    group: int
    offset: np.ndarray | None = None  # float32 [N, NG] (APoT), or None
    alpha_rows: int = 1  # consecutive rows sharing one scale (block layout); the packer stores them once
    tied: bool = False  # alpha[b] == alpha[0] * 2^-b exactly: the packers store alpha[0] only

    def dequantize(self) -> np.ndarray:
        """``Σ_b α_b ⊙ B_b`` as float32 [N, K], the matrix the kernel multiplies by."""
        q, n, k = self.signs.shape
        a = np.repeat(self.alpha, self.group, axis=2)[:, :, :k].astype(np.float32)
        b = np.where(self.signs, np.float32(1), np.float32(-1))
        w = (a * b).sum(axis=0, dtype=np.float32)
        if self.offset is not None:
            w += np.repeat(self.offset, self.group, axis=1)[:, :k]
        return w


def plane_weights(q: int) -> torch.Tensor:
    """Tied scales: plane b weighs 2^-b of plane 0's scale (float32 [q]).

    ``W ≈ z + α Σ_b 2^-b B_b`` is the uniform grid of integer quantization (levels
    ``z + α (2j + 1 - 2^q) / 2^(q-1)``, j = 0 .. 2^q - 1) written as sign planes, as T-MAC runs
    GPTQ/int weights: ONE scale (and offset) per group instead of one per plane, so at 4 bits a group
    stores 2 scales instead of 5, and the kernel combines the planes' partial sums by shifts before
    the one scale multiply. Less freedom than per-plane scales at the same group; fewer bytes."""
    return 2.0 ** -torch.arange(q, dtype=torch.float32)


def _sign_patterns(q: int) -> torch.Tensor:
    """All 2^q sign vectors, shape [2^q, q]."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=q)), dtype=torch.float32)


def _best_codes(v: torch.Tensor, alpha: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Optimal B (±1, [R, q, G]) for fixed α ([R, q], sorted descending, >= 0): the nearest codeword
    Σ ±α_b for every element.

    When α is super-increasing (α_b >= Σ_{c>b} α_c, true of the uniform grid and of most fitted
    groups) the codewords are ordered like binary numbers and the sign-by-sign greedy choice is the
    nearest one: q cheap passes. Other groups use a binary search among the sorted midpoints of their
    2^q candidates.
    """
    q = alpha.shape[1]
    b = torch.empty((v.shape[0], q, v.shape[1]), dtype=torch.float32)
    r = v.clone()
    for i in range(q):
        s = torch.where(r >= 0, 1.0, -1.0)
        b[:, i] = s
        r -= alpha[:, i : i + 1] * s
    tail = torch.flip(torch.cumsum(torch.flip(alpha, [1]), 1), [1])  # Σ_{c>=b} α_c
    superinc = (alpha[:, :-1] >= tail[:, 1:]).all(1)
    rest = torch.nonzero(~superinc).squeeze(1)
    if rest.numel():
        a, vv = alpha[rest], v[rest]
        cand, order = torch.sort(a @ patterns.T, dim=1)
        mids = 0.5 * (cand[:, 1:] + cand[:, :-1]).contiguous()
        pat = torch.gather(order, 1, torch.searchsorted(mids, vv.contiguous()))
        shifts = torch.arange(q - 1, -1, -1, dtype=pat.dtype).view(1, q, 1)
        b[rest] = ((pat.unsqueeze(1) >> shifts) & 1).to(torch.float32) * 2 - 1  # pattern bit b is plane b
    return b


def grid_levels(v: torch.Tensor, a0: torch.Tensor, q: int) -> torch.Tensor:
    """Tied scales: the nearest level j (0 .. 2^q - 1, float) of the grid ``a0 (2j + 1 - 2^q) / 2^(q-1)``
    to every element of ``v`` (``a0`` >= 0 broadcasts against ``v``). Plane b's sign is bit q-1-b of j;
    the grid is super-increasing, so this is the codeword _best_codes finds, in one rounding. Where
    a0 = 0 every plane takes the sign of v (as the greedy search does)."""
    top = 2**q - 1
    pos = a0 > 0
    t = torch.where(pos, v / torch.where(pos, a0, 1.0), torch.where(v >= 0, 1e30, -1e30))
    return torch.clamp(torch.round((t * 2.0 ** (q - 1) + top) / 2), 0, top)


def level_value(j: torch.Tensor, q: int) -> torch.Tensor:
    """Σ_b 2^-b B_b of level j: ``(2j + 1 - 2^q) / 2^(q-1)``."""
    return (2 * j + (1 - 2**q)) / 2.0 ** (q - 1)


def plane_levels(signs: torch.Tensor) -> torch.Tensor:
    """Sign planes [q, ...] (bool, True = +1) -> level index j [...] (uint8; plane b is bit q-1-b):
    the inverse of level_planes."""
    q = signs.shape[0]
    j = torch.zeros(signs.shape[1:], dtype=torch.uint8)
    for b in range(q):
        j |= signs[b].to(torch.uint8) << (q - 1 - b)
    return j


def level_planes(j: torch.Tensor, q: int) -> torch.Tensor:
    """Level indices [..., G] -> ±1 planes [..., q, G] (float32)."""
    jj = j.to(torch.int32)
    return torch.stack([((jj >> (q - 1 - b)) & 1).to(torch.float32) * 2 - 1 for b in range(q)], -2)


def _fit_groups_tied(v: torch.Tensor, q: int, rounds: int, rnd, offset: bool):
    """_fit_groups for tied scales (α_b = α_0 2^-b): the design is the level value, codes by rounding."""
    pw = plane_weights(q)
    if offset:  # the uniform grid of asymmetric RTN: spans [min, max], has a level at 0
        step = rnd((v.amax(1) - v.amin(1)) / (2**q - 1)).to(torch.float32)
        step = torch.where(step > 0, step, torch.ones_like(step))
        a0 = step * 2.0 ** (q - 2)
        j0 = torch.clamp(torch.round(-v.amin(1) / step), 0, 2**q - 1)
        z = rnd(step * ((2**q - 1) / 2 - j0)).to(torch.float32)
    else:
        a0 = rnd(v.abs().amax(1) / (2.0 - 2.0 ** (1 - q))).to(torch.float32)
        z = torch.zeros(v.shape[0], dtype=torch.float32)
    j = grid_levels(v - z[:, None], a0[:, None], q)
    lev = level_value(j, q)
    best_err = ((a0[:, None] * lev + z[:, None] - v) ** 2).sum(1)
    best_a, best_j, best_z = a0, j, z
    vd = v.to(torch.float64)
    g = v.shape[1]
    for _ in range(rounds):
        ld = lev.to(torch.float64)
        s_ll, s_lv = (ld * ld).sum(1), (ld * vd).sum(1)
        if offset:  # 2 x 2 normal equations for (α_0, z), solved in closed form
            s_l, s_v = ld.sum(1), vd.sum(1)
            det = s_ll * g - s_l * s_l
            det = torch.where(det.abs() > 1e-12 * (s_ll * g).clamp_min(1e-300), det, torch.ones_like(det))
            a_sol = (s_lv * g - s_l * s_v) / det
            z_sol = (s_ll * s_v - s_l * s_lv) / det
            z = rnd(torch.nan_to_num(z_sol)).to(torch.float32)
        else:
            a_sol = s_lv / s_ll.clamp_min(1e-300)
        a0 = rnd(torch.nan_to_num(a_sol).abs()).to(torch.float32)
        j = grid_levels(v - z[:, None], a0[:, None], q)
        lev = level_value(j, q)
        err = ((a0[:, None] * lev + z[:, None] - v) ** 2).sum(1)
        better = err < best_err
        if not bool(better.any()):
            break
        idx = torch.nonzero(better).squeeze(1)
        best_err[idx], best_a[idx], best_j[idx], best_z[idx] = err[idx], a0[idx], j[idx], z[idx]
        a0, j, z = best_a.clone(), best_j.clone(), best_z.clone()
        lev = level_value(j, q)
    return best_a[:, None] * pw[None], level_planes(best_j, q), best_z


def _fit_groups(
    v: torch.Tensor, q: int, rounds: int, rnd, offset: bool, tied: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit α [R, q] (APoT, sorted by magnitude), B [R, q, G] and an offset z [R] (APoT; zeros when
    ``offset`` is False) to the rows of v [R, G]: ``v ≈ z + Σ_b α_b B_b``. ``rnd`` rounds scales and
    offsets to the storage format (BCQConfig.rounder). ``tied``: α_b = α_0 2^-b (plane_weights), the
    least squares solves for α_0 (and z) alone and only α_0 is rounded (_fit_groups_tied)."""
    if tied:
        return _fit_groups_tied(v, q, rounds, rnd, offset)
    z = torch.zeros(v.shape[0], dtype=torch.float32)
    r = v.clone()
    pw = plane_weights(q)
    if tied and not offset:  # symmetric uniform grid spanning ±max|v|
        a0 = rnd(v.abs().amax(1) / (2.0 - 2.0 ** (1 - q))).to(torch.float32)
        alpha = a0[:, None] * pw[None]
    elif offset:  # init: the uniform grid of asymmetric RTN: spans [min, max], has a level at 0
        step = rnd((v.amax(1) - v.amin(1)) / (2**q - 1)).to(torch.float32)
        step = torch.where(step > 0, step, torch.ones_like(step))
        alpha = step[:, None] * (2.0 ** torch.arange(q - 2, -2, -1, dtype=torch.float32))[None]
        half = (2**q - 1) / 2  # levels are z + step * (j - half), j = 0 .. 2^q - 1
        j0 = torch.clamp(torch.round(-v.amin(1) / step), 0, 2**q - 1)  # level index that sits at 0
        z = rnd(step * (half - j0)).to(torch.float32)  # z itself is APoT (shifts), exact in its format
    else:
        als = []
        for _ in range(q):  # greedy init
            b = torch.where(r >= 0, 1.0, -1.0)
            a = r.abs().mean(dim=1)
            r -= a[:, None] * b
            als.append(a)
        alpha = rnd(torch.stack(als, 1)).to(torch.float32)
    patterns = _sign_patterns(q)
    b = _best_codes(v - z[:, None], alpha, patterns)

    def err_of(alpha, b, z):
        return ((torch.einsum("rq,rqg->rg", alpha, b) + z[:, None] - v) ** 2).sum(1)

    best_err = err_of(alpha, b, z)
    best_a, best_b, best_z = alpha, b, z
    vd = v.to(torch.float64)
    for _ in range(rounds):
        # least squares for α (and z jointly: design columns B_1..B_q and ones). Entries are ±1, so
        # the Gram matrix is exact in float32; the small solve runs in float64.
        d = torch.einsum("q,rqg->rg", pw, b)[:, None] if tied else b  # design: Σ 2^-b B_b, or the planes
        nq = d.shape[1]
        gram = (d @ d.transpose(1, 2)).to(torch.float64)
        rhs = torch.einsum("rqg,rg->rq", d, v).to(torch.float64)
        if offset:
            bsum = d.sum(2).to(torch.float64)
            gram = torch.cat(
                [
                    torch.cat([gram, bsum[:, :, None]], 2),
                    torch.cat([bsum, torch.full_like(bsum[:, :1], v.shape[1])], 1)[:, None, :],
                ],
                1,
            )
            rhs = torch.cat([rhs, vd.sum(1, keepdim=True)], 1)
        gram = gram + torch.eye(gram.shape[1], dtype=torch.float64) * 1e-9
        sol = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)
        sol = torch.nan_to_num(sol)
        if tied:  # a negative α_0 is the same grid with every sign flipped: the code search absorbs it
            alpha = rnd(sol[:, 0].abs()).to(torch.float32)[:, None] * pw[None]
        else:
            a, _ = torch.sort(sol[:, :q].abs(), dim=1, descending=True)
            alpha = rnd(a).to(torch.float32)
        z = rnd(sol[:, nq]).to(torch.float32) if offset else z
        b = _best_codes(v - z[:, None], alpha, patterns)
        err = err_of(alpha, b, z)
        better = err < best_err
        if not bool(better.any()):
            break
        idx = torch.nonzero(better).squeeze(1)  # keep each group's best state (in place: no full copies)
        best_err[idx], best_a[idx], best_b[idx], best_z[idx] = err[idx], alpha[idx], b[idx], z[idx]
        alpha, b, z = best_a.clone(), best_b, best_z.clone()
    return best_a, best_b, best_z


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
    offset = torch.zeros((n, ng), dtype=torch.float32)
    full = k // g
    rows = max(1, CHUNK_WEIGHTS // k)  # rows are independent: chunks keep the fit's temporaries in cache
    with torch.no_grad():
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            if full:
                v = w[r0:r1, : full * g].reshape((r1 - r0) * full, g)
                a, b, z = _fit_groups(v, q, cfg.rounds, cfg.rounder(), cfg.offset, cfg.tied)
                alpha[:, r0:r1, :full] = a.reshape(r1 - r0, full, q).permute(2, 0, 1)
                signs[:, r0:r1, : full * g] = (
                    (b > 0).reshape(r1 - r0, full, q, g).permute(2, 0, 1, 3).reshape(q, r1 - r0, full * g)
                )
                offset[r0:r1, :full] = z.reshape(r1 - r0, full)
            if full * g < k:  # ragged last group
                v = w[r0:r1, full * g :].contiguous()
                a, b, z = _fit_groups(v, q, cfg.rounds, cfg.rounder(), cfg.offset, cfg.tied)
                alpha[:, r0:r1, full] = a.T
                signs[:, r0:r1, full * g :] = (b > 0).permute(1, 0, 2)
                offset[r0:r1, full] = z
    return BCQWeight(
        signs=signs.numpy(), alpha=alpha.numpy(), group=g, offset=offset.numpy() if cfg.offset else None, tied=cfg.tied
    )
