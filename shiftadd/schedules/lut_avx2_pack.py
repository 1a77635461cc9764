"""The AVX2 micro-kernel's weight layout: fitted BCQ weights packed in the order the kernel streams
them (codes by 32-row block and table pair, scales and offsets beside them; kernels/lut_avx2.cc
describes the bytes), and random packed weights of a shape for timing."""

from __future__ import annotations

import numpy as np

from ..quant.bcq import MU, BCQWeight, plane_weights
from ..quant.pack import _exact_f16, _shared_rows
from .lut_avx2 import ROWS, dims, row_interleaved, supports
from .lut_spec import LUTSpec


def e5m2_bytes(a: np.ndarray, what: str) -> np.ndarray:
    """float8 e5m2 storage (uint8) of values that are exactly e5m2 (quant.apot.e5m2_round): the high
    byte of their float16 pattern; anything else is refused rather than silently rounded."""
    h = _exact_f16(a, what).view(np.uint16)
    bad = (h & 0xFF) != 0
    if bad.any():
        v = a[bad].ravel()[0]
        raise ValueError(
            f"{what} {float(v)!r} is not a float8 e5m2 value (fit with scale_format='e5m2'): "
            f"{int(bad.sum())} of {a.size} values"
        )
    return (h >> 8).astype(np.uint8)


def pack_avx2(w: BCQWeight, fp8: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """codes uint8 [NB, P, q, 32] ([NB, P, 32, 4] for tied 4-bit: :func:`row_interleaved`), alpha f16
    [NBA, NG, q, W] ([NBA, NG, 1, W] for tied scales: plane 0's only), offsets f16 [NBA, NG, W] ([1, 1, W]
    zeros without offset): the order the kernel streams them in (kernels/lut_avx2.cc). ``fp8`` stores
    scales and offsets as float8 e5m2 bytes (they must be e5m2 values)."""
    codes, alpha, zoff = _pack(w)
    if fp8:
        return codes, e5m2_bytes(alpha, "scale"), e5m2_bytes(zoff, "offset")
    return codes, alpha, zoff


def random_packed(spec: LUTSpec, rng=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed random weights of a shape (random signs; scales 2^-6 (tied: 2^-6 2^-b) and offsets 2^-8,
    exact in every scale format): what timing needs, for the tuner and the benchmarks alike."""
    rng = rng if rng is not None else np.random.default_rng(0)
    k, n, bits, group, offset, rows, fp8, tied = spec
    ng, na = -(-k // group), -(-n // rows)
    a = np.full((bits, na, ng), 2.0**-6, np.float32)
    if tied:
        a *= plane_weights(bits).numpy()[:, None, None]
    bw = BCQWeight(
        signs=rng.integers(0, 2, (bits, n, k), dtype=np.uint8).astype(bool),
        group=group,
        alpha_rows=rows,
        alpha=np.repeat(a, rows, axis=1)[:, :n],
        tied=tied,
        offset=np.repeat(np.full((na, ng), 2.0**-8, np.float32), rows, axis=0)[:n] if offset else None,
    )
    return pack_avx2(bw, fp8)


def _pack(w: BCQWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q, n, k = w.signs.shape
    if not supports(w.group, w.alpha_rows):
        raise ValueError(
            f"AVX2 kernel: group {w.group} / rows per scale {w.alpha_rows} not supported "
            f"(need group % 8 == 0 and rows per scale 1 or a multiple of 32)"
        )
    d = dims(k, n, w.group, w.alpha_rows)
    nb, pairs, ng = d["nb"], d["pairs"], d["ng"]
    bits = np.zeros((q, nb * ROWS, pairs * 2 * MU), dtype=np.uint8)
    bits[:, :n, :k] = w.signs
    code = (bits.reshape(q, nb * ROWS, pairs, 2, MU) << np.arange(MU, dtype=np.uint8)).sum(-1, dtype=np.uint8)
    byte = code[..., 0] | (code[..., 1] << 4)  # [q, NB*32, P]
    order = (1, 3, 2, 0) if row_interleaved(q, w.tied) else (1, 3, 0, 2)  # [NB, P, 32, q] or [NB, P, q, 32]
    codes = np.ascontiguousarray(byte.reshape(q, nb, ROWS, pairs).transpose(order))
    r, wd = w.alpha_rows, d["w"]
    alpha = w.alpha
    if w.tied:  # the kernel derives plane b's scale as plane 0's times 2^-b: check, keep plane 0
        if not np.array_equal(alpha, alpha[:1] * plane_weights(q).numpy()[:, None, None]):
            raise ValueError("tied scales: alpha[b] must equal alpha[0] * 2^-b exactly (a fit with tied=True)")
        alpha, q = alpha[:1], 1
    alpha = _exact_f16(_shared_rows(alpha, r, 1, "scale"), "scale")  # [q, N/r, NG]
    rows = alpha.shape[1]
    if r == 1:
        a = np.zeros((q, nb * ROWS, ng), np.float16)
        a[:, :rows] = alpha
        alpha_p = np.ascontiguousarray(a.reshape(q, nb, ROWS, ng).transpose(1, 3, 0, 2))
    else:
        a = np.zeros((q, d["nba"], ng), np.float16)
        a[:, :rows] = alpha
        alpha_p = np.ascontiguousarray(a.transpose(1, 2, 0))[..., None]
    if w.offset is None:
        return codes, alpha_p, np.zeros((1, 1, wd), np.float16)
    z = _exact_f16(_shared_rows(w.offset, r, 0, "offset"), "offset")  # [N/r, NG]
    zp = np.zeros((d["nba"] * wd, ng), np.float16)
    zp[: z.shape[0]] = z
    zoff = np.ascontiguousarray(zp.reshape(d["nba"], wd, ng).transpose(0, 2, 1))
    return codes, alpha_p, zoff
