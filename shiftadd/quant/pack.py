"""Pack a fitted BCQ matrix into the layout the LUT kernel reads (see schedules/lut_kernel.py)."""

from __future__ import annotations

import numpy as np

from .bcq import MU, BCQWeight

NIBBLES = 8


def pack_bcq(w: BCQWeight, vec: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """codes int32 [q, T8, Np] (4-bit code per 4 inputs, 8 per word), alpha f16 [q, NG, Np] and
    offsets f16 [NG, Np] ([1, Np] zeros when the weight has no offset). APoT scales are exact in
    float16 (see quant.apot.SPAN); anything else is refused rather than silently rounded."""
    q, n, k = w.signs.shape
    g4 = w.group // MU
    ng = w.alpha.shape[2]
    t4p = ng * g4
    t8 = -(-t4p // NIBBLES)
    npad = -(-n // vec) * vec
    bits = np.zeros((q, npad, t8 * NIBBLES * MU), dtype=np.uint32)
    bits[:, :n, :k] = w.signs
    # code of table t = Σ_j bit(4t + j) << j ; word w holds tables 8w .. 8w+7 at nibble t % 8
    nib = bits.reshape(q, npad, t8 * NIBBLES, MU)
    code = (nib << np.arange(MU, dtype=np.uint32)).sum(-1, dtype=np.uint32)  # [q, Np, T8*8]
    code = code.reshape(q, npad, t8, NIBBLES) << (4 * np.arange(NIBBLES, dtype=np.uint32))
    words = code.sum(-1, dtype=np.uint32).view(np.int32)  # [q, Np, T8]
    codes = np.ascontiguousarray(words.transpose(0, 2, 1))
    r = w.alpha_rows
    na = -(-npad // r)
    alpha = np.zeros((q, ng, na), dtype=np.float16)
    alpha[:, :, : -(-n // r)] = _exact_f16(_shared_rows(w.alpha, r, 1, "scale"), "scale").transpose(0, 2, 1)
    zoff = np.zeros((ng if w.offset is not None else 1, na), dtype=np.float16)
    if w.offset is not None:
        zoff[:, : -(-n // r)] = _exact_f16(_shared_rows(w.offset, r, 0, "offset"), "offset").T
    return codes, alpha, zoff


def _shared_rows(a: np.ndarray, r: int, axis: int, what: str) -> np.ndarray:
    """Every ``r``-th row of ``a`` along ``axis``, after checking the rows of each block agree."""
    if r == 1:
        return a
    first = np.take(a, np.arange(0, a.shape[axis], r), axis=axis)
    if not np.array_equal(np.repeat(first, r, axis=axis).take(np.arange(a.shape[axis]), axis=axis), a):
        raise ValueError(f"{what}s differ within a block of {r} rows: not the block layout the kernel reads")
    return first


def _exact_f16(a: np.ndarray, what: str) -> np.ndarray:
    h = a.astype(np.float16)
    bad = h.astype(np.float32) != a
    if bad.any():
        v = a[bad].ravel()[0]
        raise ValueError(
            f"{what} {v!r} is not exact in float16 (not an APoT value within its span, or "
            f"out of float16 range): {int(bad.sum())} of {a.size} values"
        )
    return h


def column_as_one_bit(w) -> tuple[BCQWeight, np.ndarray]:
    """A column-wise fit (``quant.gptq.ColumnBCQWeight``) as the one-bit row-wise kernel's input:
    ``y = x Wᵀ = Σ_b (x ⊙ α_b) B_bᵀ + (x ⊙ z) 1ᵀ``, i.e. ONE plane over the concatenated inputs
    ``[x⊙α_1, ..., x⊙α_q, x⊙z]`` (K' = (q + 1) K, or q K without offset) with unit scales.
    Returns (that BCQWeight, column scales [q (+1), K] to multiply x by)."""
    q, n, k = w.signs.shape
    planes = [w.signs[b] for b in range(q)]
    scales = [w.alpha[b] for b in range(q)]
    if w.offset is not None:
        planes.append(np.ones((n, k), dtype=bool))
        scales.append(w.offset)
    kk = k * len(planes)
    g = -(-kk // (2 * MU)) * 2 * MU  # whole table pairs: the AVX2 kernel reads tables two at a time
    one = BCQWeight(signs=np.concatenate(planes, 1)[None], alpha=np.ones((1, n, 1), np.float32), group=g)
    return one, np.stack(scales).astype(np.float32)


def lut_matmul_reference(x: np.ndarray, w: BCQWeight) -> np.ndarray:
    """The method's semantics in numpy, table by table: the independent reference for kernel tests."""
    x = np.asarray(x, dtype=np.float64)
    m, k = x.shape
    q, n, _ = w.signs.shape
    t4 = -(-k // MU)
    xp = np.zeros((m, t4 * MU))
    xp[:, :k] = x
    xs = xp.reshape(m, t4, MU)
    idx = np.arange(16)
    sgn = np.where((idx[:, None] >> np.arange(MU)) & 1, 1.0, -1.0)  # [16, MU]
    table = np.einsum("mtj,pj->mtp", xs, sgn)  # [M, T4, 16]
    sp = np.zeros((q, n, t4 * MU), dtype=np.int64)
    sp[:, :, :k] = w.signs
    code = (sp.reshape(q, n, t4, MU) << np.arange(MU)).sum(-1)  # [q, N, T4]
    g4 = w.group // MU
    y = np.zeros((m, n))
    if w.offset is not None:  # z · (sum of the group's activations) = z · Σ_t T[t, 15]
        for g in range(w.alpha.shape[2]):
            y += w.offset[:, g][None, :] * table[:, g * g4 : (g + 1) * g4, 15].sum(-1)[:, None]
    for b in range(q):
        looked = np.take_along_axis(table[:, None, :, :], code[b][None, :, :, None], axis=3)[..., 0]  # [M,N,T4]
        for g in range(w.alpha.shape[2]):
            y += w.alpha[b, :, g][None, :] * looked[:, :, g * g4 : (g + 1) * g4].sum(-1)
    return y
