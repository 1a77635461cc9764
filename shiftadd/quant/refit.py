"""Output-error refit of the scales and offsets of a row-group BCQ fit, for fixed sign planes.

GPTQ's column loop (quant/gptq.py) chooses codes against a codebook (α, z per row, plane and group)
that was fitted to the weights alone before the loop ran ("static groups": act-order visits a
group's columns out of order). For fixed signs the output error of one row

    (w - A θ)ᵀ H (w - A θ),   θ = the row's α (plane x group) and z (group),

is quadratic in θ, so the best codebook for the chosen codes is one small least-squares solve per
row: ``θ = (Aᵀ H A)⁻¹ Aᵀ H w`` with ``A`` the row's ±1 planes (and ones for z) split by group. H
couples the groups, which is the point: a group's scale can absorb error its neighbours' inputs
correlate with. The solution is then rounded to the storage format (APoT / e5m2) and a row keeps
whichever of the old and new codebooks has the lower output error (rounding can undo the gain).
Alternating this with the loop (codes for the refitted codebook, refit again) is the paper's
alternating BCQ carried over to the output objective (method.md §2-3); one refit, and more so three
alternations, lowered the held-out perplexity (docs/ENGINEERING.md).
"""

from __future__ import annotations

import numpy as np
import torch

from .bcq import BCQWeight, level_planes, level_value, plane_levels, plane_weights

# Rows solved at once: bounds the [planes, groups, rows, K] float64 intermediate to ~64 MB.
_CHUNK_BYTES = 64 << 20


def row_errors(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row output error ``diag((w - ŵ) H (w - ŵ)ᵀ)`` (float64, [N])."""
    d = w.to(torch.float64) - w_hat.to(torch.float64)
    return ((d @ H) * d).sum(1)


def refit_scales(w: torch.Tensor, bw: BCQWeight, H: torch.Tensor, rnd) -> BCQWeight:
    """The output-error-optimal (α, z) of ``bw``'s codes against ``H`` ([K, K] float64, already
    dampened), rounded by ``rnd``; per row, the better of that and ``bw`` (by output error).

    ``w`` is the [N, K] float64 target. Planes whose solved α is negative flip their signs in that
    group, and α is re-sorted descending per group, the form the code search and packers expect.
    Tied scales (``bw.tied``) solve for α_0 alone (the design's column is Σ_b 2^-b B_b) and stay tied.
    """
    q = bw.bits
    j = plane_levels(torch.from_numpy(bw.signs))
    err = row_errors(w, torch.from_numpy(bw.dequantize()), H)
    zoff = torch.from_numpy(bw.offset) if bw.offset is not None else torch.zeros(bw.alpha.shape[1:])
    hw = w.to(torch.float64) @ H
    off = bw.offset is not None
    j, alpha, zoff, _ = solve_codebooks(
        j, torch.from_numpy(bw.alpha), zoff, err, H, hw, (hw * w).sum(1), bw.group, q, bw.tied, off, rnd
    )
    return BCQWeight(
        signs=level_signs(j, q),
        alpha=alpha.numpy(),
        group=bw.group,
        offset=zoff.numpy() if bw.offset is not None else None,
        alpha_rows=bw.alpha_rows,
        tied=bw.tied,
    )


def level_signs(j: torch.Tensor, q: int) -> np.ndarray:
    """Level indices [N, K] -> sign planes [q, N, K] (bool, True = +1)."""
    return (level_planes(j, q).movedim(-2, 0) > 0).numpy()


def solve_codebooks(j, alpha, zoff, err, H, hw, wHw, g, q, tied, offset, rnd):
    """One refit of a row-group codebook for fixed codes, in place of the rows it improves.

    ``j`` [N, K] level indices (uint8), ``alpha`` [q, N, NG], ``zoff`` [N, NG] (zeros without
    ``offset``), ``err`` [N] the rows' current output errors, ``H`` [K, K] (dampened, float64), ``hw``
    = w H and ``wHw`` = its row sums with w. The new codebook's error is
    ``wᵀHw - 2θᵀ rhs + θᵀ G θ`` for the rounded θ, so no [N, K] x [K, K] product is needed to compare.
    Returns (j, alpha, zoff, err), each row the better of old and new."""
    n, k = j.shape
    ng = -(-k // g)
    kp = ng * g
    qs = 1 if tied else q  # scales solved per group
    P = qs + int(offset)
    Hp = torch.zeros((kp, kp), dtype=torch.float32)
    Hp[:k, :k] = H
    Hb = Hp.reshape(ng, g, kp)
    hwp = torch.zeros((n, kp), dtype=torch.float64)
    hwp[:, :k] = hw
    hwg = hwp.reshape(n, ng, g)
    S = torch.zeros((qs, n, kp), dtype=torch.float32)  # the design's sign columns, by group
    if tied:
        S[0, :, :k] = level_value(j.to(torch.float32), q)
    else:
        pm = level_planes(j, q).transpose(0, 1)  # [q, N, K]
        S[:, :, :k] = pm
    T1 = Hb.sum(1).reshape(ng, ng, g)  # ones column: Σ_{e in g} H[e, f], every row alike
    G = torch.empty((n, P, ng, P, ng), dtype=torch.float64)
    rhs = torch.empty((n, P, ng), dtype=torch.float64)
    chunk = max(1, _CHUNK_BYTES // (4 * qs * ng * kp))
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        Sc = S[:, r0:r1].reshape(qs, r1 - r0, ng, g)
        T = torch.matmul(Sc.permute(0, 2, 1, 3), Hb[None]).reshape(qs, ng, r1 - r0, ng, g)  # [p, g, n, h, e]
        G[r0:r1, :qs, :, :qs] = torch.einsum("pgnhe,rnhe->npgrh", T, Sc).to(torch.float64)
        rhs[r0:r1, :qs] = torch.einsum("pnge,nge->npg", Sc.to(torch.float64), hwg[r0:r1])
        if offset:
            c1 = torch.einsum("ghe,rnhe->ngrh", T1, Sc).to(torch.float64)  # (ones of g) x (sign column r of h)
            G[r0:r1, qs, :, :qs] = c1
            G[r0:r1, :qs, :, qs] = c1.permute(0, 2, 3, 1)
    if offset:
        G[:, qs, :, qs] = T1.sum(2).to(torch.float64)[None]
        rhs[:, qs] = hwg.sum(2)
    G = G.reshape(n, P * ng, P * ng)
    reg = torch.diag_embed(G.diagonal(dim1=1, dim2=2) * 1e-9 + 1e-30)  # empty groups (padding) stay solvable
    sol = torch.linalg.solve(G + reg, rhs.reshape(n, P * ng, 1))[..., 0].reshape(n, P, ng)
    sol = torch.nan_to_num(sol)
    a = sol[:, :qs].permute(1, 0, 2)  # [qs, N, NG]
    mag = rnd(a.abs()).to(torch.float32)
    theta = torch.cat([torch.sign(a).permute(1, 0, 2) * mag.permute(1, 0, 2).to(torch.float64)], 1)
    z_new = rnd(sol[:, qs]).to(torch.float32) if offset else zoff
    if offset:
        theta = torch.cat([theta, z_new[:, None].to(torch.float64)], 1)
    th = theta.reshape(n, P * ng, 1)
    e_new = wHw - 2 * (th[..., 0] * rhs.reshape(n, P * ng)).sum(1) + (th.transpose(1, 2) @ G @ th)[:, 0, 0]
    better = e_new < err
    flip = (a < 0).repeat_interleave(g, dim=2)[:, :, :k]  # [qs, N, K]
    if tied:  # a negative α_0 flips every plane of the group: level j becomes 2^q - 1 - j
        j_new = torch.where(flip[0], (2**q - 1) - j, j)
        a_new = mag[0][None] * plane_weights(q)[:, None, None]
    else:
        mag_sorted, order = torch.sort(mag, dim=0, descending=True)
        sg = (pm > 0) ^ flip
        sg = torch.gather(sg, 0, order.repeat_interleave(g, dim=2)[:, :, :k])
        j_new = plane_levels(sg)
        a_new = mag_sorted
    keep = better[:, None]
    return (
        torch.where(keep, j_new, j),
        torch.where(better[None, :, None], a_new, alpha),
        torch.where(keep, z_new, zoff),
        torch.where(better, e_new, err),
    )
