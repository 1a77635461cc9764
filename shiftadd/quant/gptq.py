"""Error-feedback BCQ (method.md §3): GPTQ's column loop with the BCQ/APoT codebook inside it.

Given the Hessian ``H = (1/n) Σ x xᵀ`` of a linear layer's inputs, columns are quantized one at a
time (in descending ``diag(H)`` order with ``act_order``) and each column's error, scaled by the
inverse Hessian's Cholesky factor, is pushed onto the columns not yet quantized, with lazy block
updates. This minimises the output error ‖(W - Ŵ) X‖ rather than the weight error.

Three scale layouts (method.md §1), each fitted where the loop allows:

* ``row-group`` (the CPU LUT kernel's native one): α per (row, plane, group of G inputs). With
  act-order a group's columns are visited out of order, so its codebook (α, z) is fitted once on the
  weights up front ("static groups", as GPTQ does) and the loop chooses codes; fit_layer then refits
  that codebook to the chosen codes against H and alternates (quant/refit.py, ``BCQConfig.refits``).
* ``block`` (the authors' GPU layout): α per (block of 8 inputs x ``block_rows`` rows, plane). Blocks
  are visited whole (act-order over blocks); each block's codebooks are refitted inside the loop on
  the error-updated columns, just before its 8 columns are coded.
* ``column`` (the paper's "acc" mode): α per (input column, plane), refitted inside the loop on each
  error-updated column, so the per-column fit is the GPTQ step's exact minimiser (the paper's point).

``row-group`` and ``block`` return a :class:`BCQWeight` (block scales repeated over their rows, group
8, ``alpha_rows`` set so the packer stores them once); ``column`` returns a :class:`ColumnBCQWeight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .bcq import BCQConfig, BCQWeight, SignPlanes, _best_codes, _fit_groups, _sign_patterns, quantize_matrix
from .gptq_rows import fit_rows, inverse_factor, prepare

BLOCK_COLS = 8


@dataclass
class ColumnBCQWeight(SignPlanes):
    """Column-wise BCQ: ``W[:, k] ≈ z[k] + Σ_b α[b, k] · B[b, :, k]``."""

    signs: np.ndarray  # bool [q, N, K]
    alpha: np.ndarray  # float32 [q, K] (APoT)
    offset: np.ndarray | None = None  # float32 [K] (APoT)

    def dequantize(self) -> np.ndarray:
        b = np.where(self.signs, np.float32(1), np.float32(-1))
        w = (self.alpha[:, None, :] * b).sum(0, dtype=np.float32)
        if self.offset is not None:
            w += self.offset[None, :]
        return w


def _prepare(w, hessian, damp):
    W, H = prepare(w, hessian, damp)
    return np.asarray(w, dtype=np.float32), W, H


def fit_layer(w: np.ndarray, cfg: BCQConfig, hessian: np.ndarray | None = None, damp: float = 0.01):
    """The fit the compiler uses for one layer in ``cfg.layout``: error feedback with a Hessian,
    weight-only without (for block/column: the same loop with H = I, i.e. no feedback).

    Row-group fits then alternate ``cfg.refits`` times: refit the codebook (α, z) to the chosen codes
    against H (quant/refit.py), and, except after the last refit, run the loop again with that
    codebook. Every step keeps, per row, the lower output error, so more refits never hurt on H."""
    if hessian is None:
        if cfg.layout == "row-group":
            return quantize_matrix(w, cfg)
        return quantize_matrix_gptq(w, np.eye(np.shape(w)[1]), cfg, act_order=False)
    if cfg.layout == "row-group":
        return fit_rows([(w, hessian)], cfg, damp)[0]
    return quantize_matrix_gptq(w, hessian, cfg, damp=damp)


def quantize_matrix_gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    cfg: BCQConfig,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
    codebook: BCQWeight | None = None,
):
    """Fit ``w`` ([N, K]) against inputs with second moment ``hessian`` ([K, K], symmetric PSD),
    in the scale layout ``cfg.layout``. ``codebook`` (row-group only): the static (α, z) the loop
    codes against, instead of a weight-only fit (fit_layer's alternation passes its refit)."""
    layout, block_rows = cfg.layout, cfg.block_rows
    if codebook is not None and (layout != "row-group" or codebook.signs.shape[:2] != (cfg.bits, np.shape(w)[0])):
        raise ValueError(f"codebook: a row-group fit of {cfg.bits} bits and {np.shape(w)[0]} rows expected")
    w, W, H = _prepare(w, hessian, damp)
    n, k = w.shape
    q = cfg.bits
    if layout == "block":
        nb = -(-k // BLOCK_COLS)
        d = torch.diag(H)
        full = k // BLOCK_COLS  # act-order over whole blocks; a ragged last block goes last, so every
        bscore = torch.zeros(nb, dtype=torch.float64).index_add_(0, torch.arange(k) // BLOCK_COLS, d)
        border = torch.argsort(bscore[:full], descending=True) if act_order else torch.arange(full)
        border = border.tolist() + ([full] if full < nb else [])  # block starts at a multiple of 8
        perm = torch.cat([torch.arange(b * BLOCK_COLS, min((b + 1) * BLOCK_COLS, k)) for b in border])
        block = -(-block // BLOCK_COLS) * BLOCK_COLS  # lazy blocks hold whole scale blocks
    else:
        perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W = W[:, perm]
    H = H[perm][:, perm]
    U = inverse_factor(H)
    patterns = _sign_patterns(q)
    signs = torch.empty((q, n, k), dtype=torch.bool)

    if layout == "row-group":
        base = codebook if codebook is not None else quantize_matrix(w, cfg)  # static per-group codebooks (α, z)
        g = base.group
        alpha = torch.from_numpy(base.alpha)  # [q, N, NG]
        zoff = torch.from_numpy(base.offset) if base.offset is not None else torch.zeros((n, alpha.shape[2]))
    elif layout == "block":
        nbk = -(-k // BLOCK_COLS)
        alpha = torch.zeros((q, n, nbk), dtype=torch.float32)
        zoff = torch.zeros((n, nbk), dtype=torch.float32)
    else:
        col_alpha = torch.zeros((q, k), dtype=torch.float32)
        col_z = torch.zeros(k, dtype=torch.float32)

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            v = W1[:, i].to(torch.float32)
            if layout == "column":  # refit this column's codebook on the error-updated column
                a1, b1, z1 = _fit_groups(v[None, :], q, cfg.rounds, cfg.rounder(), cfg.offset)
                col_alpha[:, col], col_z[col] = a1[0], z1[0]
                b = b1[0].T  # [N, q]
                qcol = (a1[0].to(torch.float64)[None, :] * b.to(torch.float64)).sum(1) + float(z1[0])
            else:
                if layout == "block" and col % BLOCK_COLS == 0:
                    _fit_block(
                        W1[:, i : i + min(BLOCK_COLS, k - col)], col // BLOCK_COLS, q, cfg, block_rows, alpha, zoff
                    )
                grp = col // (g if layout == "row-group" else BLOCK_COLS)
                a = alpha[:, :, grp].T.contiguous()  # [N, q], sorted descending per row
                z = zoff[:, grp]
                b = _best_codes((v - z)[:, None], a, patterns)[:, :, 0]  # [N, q]
                qcol = (a.to(torch.float64) * b.to(torch.float64)).sum(1) + z.to(torch.float64)
            signs[:, :, col] = (b > 0).T
            err = (W1[:, i] - qcol) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    if layout == "column":
        return ColumnBCQWeight(
            signs=signs.numpy(), alpha=col_alpha.numpy(), offset=col_z.numpy() if cfg.offset else None
        )
    if layout == "block":
        return BCQWeight(
            signs=signs.numpy(),
            alpha=alpha.numpy(),
            group=BLOCK_COLS,
            offset=zoff.numpy() if cfg.offset else None,
            alpha_rows=block_rows,
        )
    return BCQWeight(signs=signs.numpy(), alpha=base.alpha, group=g, offset=base.offset, tied=base.tied)


def _fit_block(blk, grp, q, cfg, rows, alpha, zoff):
    """Fit the codebooks (α, z per ``rows`` rows) of scale block ``grp`` on its current,
    error-updated columns ``blk`` [N, width]."""
    n = blk.shape[0]
    blk = blk.to(torch.float32)
    full = n // rows
    if full:
        a, _, z = _fit_groups(blk[: full * rows].reshape(full, -1), q, cfg.rounds, cfg.rounder(), cfg.offset)
        alpha[:, : full * rows, grp] = a.T.repeat_interleave(rows, dim=1)
        zoff[: full * rows, grp] = z.repeat_interleave(rows)
    if full * rows < n:
        a, _, z = _fit_groups(blk[full * rows :].reshape(1, -1), q, cfg.rounds, cfg.rounder(), cfg.offset)
        alpha[:, full * rows :, grp] = a[0][:, None]
        zoff[full * rows :, grp] = z[0]
