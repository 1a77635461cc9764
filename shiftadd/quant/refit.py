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

from .bcq import BCQWeight, plane_weights

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
    q, n, k = bw.signs.shape
    g = bw.group
    ng = -(-k // g)
    kp = ng * g
    off = bw.offset is not None
    tied = bw.tied
    qs = 1 if tied else q  # scales solved per group
    P = qs + int(off)
    Hp = torch.zeros((kp, kp), dtype=torch.float64)
    Hp[:k, :k] = H
    Hb = Hp.reshape(ng, g, kp)
    Hw = torch.zeros((n, kp), dtype=torch.float64)
    Hw[:, :k] = w @ H
    signs = torch.from_numpy(bw.signs)
    sol = torch.empty((n, P, ng), dtype=torch.float64)
    chunk = max(1, _CHUNK_BYTES // (8 * P * ng * kp))
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        S = torch.zeros((P, r1 - r0, kp), dtype=torch.float64)  # the design: planes (and ones), by group
        pm = torch.where(signs[:, r0:r1], 1.0, -1.0).to(torch.float64)
        S[:qs, :, :k] = torch.einsum("q,qnk->nk", plane_weights(q).to(torch.float64), pm)[None] if tied else pm
        if off:
            S[qs, :, :k] = 1.0
        S = S.reshape(P, r1 - r0, ng, g)
        HS = torch.einsum("pnge,gek->pgnk", S, Hb).reshape(P, ng, r1 - r0, ng, g)
        gram = torch.einsum("pgnhe,rnhe->npgrh", HS, S).reshape(r1 - r0, P * ng, P * ng)
        rhs = torch.einsum("pnge,nge->npg", S, Hw[r0:r1].reshape(r1 - r0, ng, g)).reshape(r1 - r0, P * ng)
        diag = gram.diagonal(dim1=1, dim2=2)
        gram += torch.diag_embed(diag * 1e-9 + 1e-30)  # empty groups (padding) stay solvable
        sol[r0:r1] = torch.linalg.solve(gram, rhs[..., None])[..., 0].reshape(r1 - r0, P, ng)
    a = sol[:, :qs].permute(1, 0, 2)  # [qs, N, NG]
    flip = (a < 0).repeat_interleave(g, dim=2)[:, :, :k]
    new_signs = signs ^ flip  # tied: a negative α_0 flips every plane of the group
    if tied:
        alpha = rnd(a[0].abs()).to(torch.float32)[None] * plane_weights(q)[:, None, None]
    else:
        a, order = torch.sort(a.abs(), dim=0, descending=True)
        new_signs = torch.gather(new_signs, 0, order.repeat_interleave(g, dim=2)[:, :, :k])
        alpha = rnd(a).to(torch.float32)
    cand = BCQWeight(
        signs=new_signs.numpy(),
        alpha=alpha.numpy(),
        group=g,
        offset=rnd(sol[:, qs]).to(torch.float32).numpy() if off else None,
        alpha_rows=bw.alpha_rows,
        tied=tied,
    )
    better = row_errors(w, torch.from_numpy(cand.dequantize()), H) < row_errors(w, torch.from_numpy(bw.dequantize()), H)
    if bool(better.all()):
        return cand
    keep = better.numpy()
    signs_out = np.where(keep[None, :, None], cand.signs, bw.signs)
    alpha_out = np.where(keep[None, :, None], cand.alpha, bw.alpha)
    offset_out = np.where(keep[:, None], cand.offset, bw.offset) if off else None
    return BCQWeight(signs=signs_out, alpha=alpha_out, group=g, offset=offset_out, alpha_rows=bw.alpha_rows, tied=tied)
