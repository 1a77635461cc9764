"""The row-group layout's calibrated fit (GPTQ loop + codebook refits), batched over matrices.

A compile fits hundreds of matrices, most of them the same shape with different Hessians (one per
decoder layer). The column loop is sequential in the columns but independent across rows and across
matrices, so it runs once over a stack ``[L, K, N]`` of L matrices: Python's per-column cost is paid
once per stack instead of once per matrix. Matrices that share a Hessian (Q/K/V, gate/up: the same
input) are first joined along their rows, which is exact (every step is per row).

Bookkeeping that the per-matrix fit paid in ``[N, K] x [K, K]`` products is free here:

* the loop's per-row output error is ``Σ_i err_i²`` (``E = Err · U`` and ``U H Uᵀ = I`` for the
  upper Cholesky factor U of H⁻¹), so choosing the better of two codings needs no product;
* a refitted codebook's error is ``wᵀHw - 2θᵀAᵀHw + θᵀ(AᵀHA)θ`` from the Gram matrix and right-hand
  side the least squares solved anyway (quant/refit.py);
* with tied scales the codes are the nearest level of a uniform grid: one rounding, not q passes.

Codes are kept as the level index ``j`` (plane b's sign is bit ``q-1-b`` of ``j``) until the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import executors
from .bcq import (
    BCQConfig,
    BCQWeight,
    _best_codes,
    _sign_patterns,
    grid_levels,
    level_value,
    plane_levels,
    quantize_matrix,
)
from .refit import level_signs, solve_codebooks

LAZY_BLOCK = 128  # columns per lazy update: the in-block rank-1 updates cost N·K·LAZY_BLOCK/2
STACK_BYTES = 256 << 20  # float32 weights of one stack (the loop also holds H⁻¹ factors and codes)


@dataclass
class Unit:
    """Rows fitted against one Hessian: the prepared target ``w`` [N, K] float64 (dead inputs zeroed),
    the dampened Hessian ``h`` [K, K] float64, its act-order ``perm`` and inverse factor ``u`` (float32,
    in that order), and the static codebook the first loop codes against."""

    w: torch.Tensor
    h: torch.Tensor
    perm: torch.Tensor
    u: torch.Tensor
    base: BCQWeight


def prepare(w: np.ndarray, hessian: np.ndarray, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 target and dampened Hessian GPTQ works with (dead inputs: weight 0, H_ii = 1)."""
    w = np.asarray(w, dtype=np.float32)
    check_hessian(w.shape, hessian, damp)
    h = np.asarray(hessian, dtype=np.float64)
    k = w.shape[1]
    W = torch.from_numpy(w.astype(np.float64))
    H = torch.from_numpy(h.copy())
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=torch.float64)
    return W, H


def check_hessian(shape, hessian, damp: float) -> None:
    """A [K, K] finite Hessian for a weight of ``shape`` [N, K], and a damping >= 0."""
    k = shape[1]
    h = np.asarray(hessian)
    if h.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a weight of shape {tuple(shape)}, got {h.shape}")
    if not np.isfinite(h).all():
        raise ValueError("hessian contains NaN or Inf")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")


def inverse_factor(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (``H⁻¹ = UᵀU``), the GPTQ update's rows: with ``H = R Rᵀ``,
    R upper (the Cholesky factor of H with rows and columns reversed), ``U = R⁻¹``: one factorization
    and one triangular inverse instead of a factorization, an inverse and a second factorization."""
    R = torch.linalg.cholesky(H.flip(0, 1)).flip(0, 1)
    return torch.linalg.solve_triangular(R, torch.eye(H.shape[0], dtype=H.dtype), upper=True)


def fit_rows(jobs: list[tuple[np.ndarray, np.ndarray]], cfg: BCQConfig, damp: float = 0.01, progress=None):
    """Row-group fits of ``jobs`` ((weight [N, K], Hessian [K, K]) pairs, one config) as fit_layer
    does them: the loop against static codebooks, then ``cfg.refits`` rounds of refit (and, except
    after the last, the loop again against the refitted codebook), each row keeping its lower output
    error. Jobs whose Hessian is the same object are joined; stacks hold same-shape units.
    ``progress(weights)`` is called as stacks finish. Returns one BCQWeight per job, in order."""
    if cfg.layout != "row-group":
        raise ValueError(f"fit_rows fits the row-group layout, got {cfg.layout!r}")
    members = _same_hessian(jobs)  # units: jobs fitted as one matrix
    stacks: dict[tuple[int, int], list[int]] = {}
    for u, idx in enumerate(members):
        w0, h = jobs[idx[0]]
        check_hessian(np.shape(w0), h, damp)  # bad input fails before any fit
        n = sum(np.shape(jobs[i][0])[0] for i in idx)
        stacks.setdefault((n, np.shape(w0)[1]), []).append(u)
    chunks = []  # (stack shape, its units): one task each, one stack's float64 copies alive at a time
    for (n, k), us in stacks.items():
        per = max(1, STACK_BYTES // (4 * n * k))
        chunks.extend(((n, k), us[s : s + per]) for s in range(0, len(us), per))
    tasks = (
        ([([jobs[i][0] for i in members[u]], jobs[members[u][0]][1]) for u in chunk], cfg, damp) for _, chunk in chunks
    )
    results: list[BCQWeight | None] = [None] * len(jobs)
    for ((n, k), chunk), out in zip(chunks, executors.current().map(fit_chunk, tasks), strict=True):
        for u, bw in zip(chunk, out, strict=True):
            r0 = 0
            for i in members[u]:
                rows = np.shape(jobs[i][0])[0]
                results[i] = _rows_of(bw, r0, r0 + rows)
                r0 += rows
        if progress is not None:
            progress(len(chunk) * n * k)
    return results


def fit_chunk(parts: list[tuple[list[np.ndarray], np.ndarray]], cfg: BCQConfig, damp: float) -> list[BCQWeight]:
    """One task: the units ``parts`` (weights sharing one Hessian, joined by rows; every unit of one
    shape) fitted as one stack. Self-contained, so an executor may run it in another process."""
    return _fit_stack([_unit(ws, h, cfg, damp) for ws, h in parts], cfg)


def _same_hessian(jobs) -> list[list[int]]:
    """Job indices grouped by equal Hessians (the same object, or equal values: calibration keeps
    one per layer even where layers read one input)."""
    groups: list[list[int]] = []
    seen: dict[tuple, list[int]] = {}  # cheap fingerprint -> group numbers
    for i, (_, h) in enumerate(jobs):
        h = np.asarray(h)
        key = (h.shape, float(np.trace(h)) if h.ndim == 2 else 0.0, float(h.reshape(-1)[:64].sum()))
        for gi in seen.get(key, []):
            other = np.asarray(jobs[groups[gi][0]][1])
            if other is h or np.array_equal(other, h):
                groups[gi].append(i)
                break
        else:
            seen.setdefault(key, []).append(len(groups))
            groups.append([i])
    return groups


def _unit(ws: list[np.ndarray], hessian: np.ndarray, cfg: BCQConfig, damp: float) -> Unit:
    """The weights ``ws`` (one Hessian) joined by rows, prepared, with act order, inverse factor and
    static (weight-only) codebooks."""
    w = np.concatenate([np.asarray(x, np.float32) for x in ws], 0) if len(ws) > 1 else ws[0]
    W, H = prepare(w, hessian, damp)
    perm = torch.argsort(torch.diag(H), descending=True)
    u = inverse_factor(H[perm][:, perm]).to(torch.float32)
    return Unit(W, H, perm, u, quantize_matrix(W.to(torch.float32), cfg))


def _rows_of(bw: BCQWeight, r0: int, r1: int) -> BCQWeight:
    return BCQWeight(
        signs=np.ascontiguousarray(bw.signs[:, r0:r1]),
        alpha=np.ascontiguousarray(bw.alpha[:, r0:r1]),
        group=bw.group,
        offset=None if bw.offset is None else np.ascontiguousarray(bw.offset[r0:r1]),
        alpha_rows=bw.alpha_rows,
        tied=bw.tied,
    )


def _fit_stack(units: list[Unit], cfg: BCQConfig) -> list[BCQWeight]:
    """fit_layer's alternation for a stack of same-shape units."""
    q, tied, rnd = cfg.bits, cfg.tied, cfg.rounder()
    alpha = torch.stack([torch.from_numpy(u.base.alpha) for u in units])  # [L, q, N, NG]
    zoff = torch.stack(
        [torch.from_numpy(u.base.offset) if u.base.offset is not None else torch.zeros(alpha.shape[2:]) for u in units]
    )
    g = units[0].base.group
    j, err = _loop(units, alpha, zoff, g, q, tied)
    if not cfg.refits:
        return [_weight(j[i], alpha[i], zoff[i], g, cfg) for i in range(len(units))]
    hw = [u.w @ u.h for u in units]
    wHw = [(a * u.w).sum(1) for a, u in zip(hw, units, strict=True)]
    for r in range(cfg.refits):
        for i, u in enumerate(units):
            j[i], alpha[i], zoff[i], err[i] = solve_codebooks(
                j[i], alpha[i], zoff[i], err[i], u.h, hw[i], wHw[i], g, q, tied, cfg.offset, rnd
            )
        if r + 1 < cfg.refits:
            j2, err2 = _loop(units, alpha, zoff, g, q, tied)
            keep = err2 < err
            j = torch.where(keep[:, :, None], j2, j)
            err = torch.where(keep, err2, err)
    return [_weight(j[i], alpha[i], zoff[i], g, cfg) for i in range(len(units))]


def _weight(j, alpha, zoff, g, cfg) -> BCQWeight:
    return BCQWeight(
        signs=level_signs(j, cfg.bits),
        alpha=alpha.numpy().copy(),
        group=g,
        offset=zoff.numpy().copy() if cfg.offset else None,
        tied=cfg.tied,
    )


def _loop(units: list[Unit], alpha, zoff, g: int, q: int, tied: bool):
    """GPTQ's column loop over a stack, in act order, with lazy block updates, coding each column
    against the codebook (α [L, q, N, NG], z [L, N, NG]) of its group. Returns the level indices
    [L, N, K] (uint8, original column order) and each row's output error [L, N] (float64)."""
    L = len(units)
    n, k = units[0].w.shape
    perm = torch.stack([u.perm for u in units])  # [L, K]
    W = torch.stack([u.w.T[u.perm].to(torch.float32) for u in units])  # [L, K, N]: columns contiguous
    U = torch.stack([u.u for u in units])  # [L, K, K]
    d = torch.diagonal(U, dim1=1, dim2=2)  # [L, K]
    grp = perm // g
    ar = torch.arange(L)
    codes = torch.empty((L, k, n), dtype=torch.uint8)
    err_rows = torch.zeros((L, n), dtype=torch.float64)
    patterns = None if tied else _sign_patterns(q)
    for i1 in range(0, k, LAZY_BLOCK):
        i2 = min(i1 + LAZY_BLOCK, k)
        W1 = W[:, i1:i2]  # a view: updated in place
        E1 = torch.empty((L, i2 - i1, n), dtype=torch.float32)
        for i in range(i2 - i1):
            c = i1 + i
            v = W1[:, i]  # [L, N]
            gi = grp[:, c]
            z = zoff[ar, :, gi]  # [L, N]
            if tied:
                a0 = alpha[ar, 0, :, gi]  # [L, N]
                jj = grid_levels(v - z, a0, q)
                qv = z + a0 * level_value(jj, q)
                codes[:, c] = jj.to(torch.uint8)
            else:
                a = alpha[ar, :, :, gi].permute(0, 2, 1).reshape(L * n, q)  # [L·N, q]
                b = _best_codes((v - z).reshape(L * n, 1), a, patterns)[:, :, 0]  # ±1 [L·N, q]
                qv = z + (a * b).sum(1).reshape(L, n)
                codes[:, c] = plane_levels((b > 0).T).reshape(L, n)
            e = (v - qv) / d[:, c, None]
            if i + 1 < i2 - i1:
                W1[:, i + 1 :].addcmul_(U[:, c, c + 1 : i2, None], e[:, None, :], value=-1.0)
            E1[:, i] = e
        err_rows += (E1.to(torch.float64) ** 2).sum(1)
        if i2 < k:
            W[:, i2:] -= torch.bmm(U[:, i1:i2, i2:].transpose(1, 2), E1)
    inv = torch.argsort(perm, dim=1)
    j = torch.stack([codes[i].index_select(0, inv[i]).T for i in range(L)]).contiguous()
    return j, err_rows
