"""Error-feedback BCQ (method.md §3): GPTQ's column loop with the BCQ/APoT codebook inside it.

Given the Hessian ``H = (1/n) Σ x xᵀ`` of a linear layer's inputs, columns are quantized one at a
time (in descending ``diag(H)`` order with ``act_order``) and each column's error, scaled by the
inverse Hessian's Cholesky factor, is pushed onto the columns not yet quantized, with lazy block
updates. The codebook of each (row, group) (its APoT scales α and offset z) is fitted once up front
on the weights ("static groups"), so act-order never changes the group layout the kernel reads.
This minimises the output error ‖(W - Ŵ) X‖ rather than the weight error.
"""

from __future__ import annotations

import numpy as np
import torch

from .bcq import BCQConfig, BCQWeight, _best_codes, _sign_patterns, quantize_matrix


def quantize_matrix_gptq(w: np.ndarray, hessian: np.ndarray, cfg: BCQConfig, damp: float = 0.01,
                         block: int = 128, act_order: bool = True) -> BCQWeight:
    """Fit ``w`` ([N, K]) against inputs with second moment ``hessian`` ([K, K], symmetric PSD)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    h = np.asarray(hessian, dtype=np.float64)
    if h.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a weight of shape {w.shape}, got {h.shape}")
    if not np.isfinite(h).all():
        raise ValueError("hessian contains NaN or Inf")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    base = quantize_matrix(w, cfg)  # static per-group codebooks (α, z)
    g = base.group
    W = torch.from_numpy(w.astype(np.float64))
    H = torch.from_numpy(h.copy())
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=torch.float64)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W = W[:, perm]
    H = H[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    alpha = torch.from_numpy(base.alpha)  # [q, N, NG]
    zoff = torch.from_numpy(base.offset) if base.offset is not None else torch.zeros((n, alpha.shape[2]))
    patterns = _sign_patterns(cfg.bits)
    signs = torch.empty((cfg.bits, n, k), dtype=torch.bool)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            a = alpha[:, :, grp].T.contiguous()  # [N, q], sorted descending per row
            z = zoff[:, grp].to(torch.float64)
            b = _best_codes((W1[:, i] - z).to(torch.float32)[:, None], a, patterns)[:, :, 0]  # [N, q]
            qcol = (a.to(torch.float64) * b.to(torch.float64)).sum(1) + z
            signs[:, :, col] = (b > 0).T
            err = (W1[:, i] - qcol) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return BCQWeight(signs=signs.numpy(), alpha=base.alpha, group=g, offset=base.offset)
