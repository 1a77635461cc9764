"""Numpy references of the AVX2 micro-kernel: its int8 tables built with the same float32 ops in the
same order, the LUT path's and the int8 path's results, and the bounds within which they meet the
exact float result (the property tests hold the kernel to these)."""

from __future__ import annotations

import numpy as np

from ..quant.bcq import MU, BCQWeight
from .lut_avx2 import dims


def quantized_tables(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 tables [M, T4p, 16], scales [M, NU]) exactly as the kernel builds them (float32 ops in the
    same order, round half to even)."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    d = dims(k, 1, group)
    t4p, u4 = 2 * d["pairs"], d["u4"]
    xp = np.zeros((m, t4p * MU), np.float32)
    xp[:, :k] = x
    xs = xp.reshape(m, t4p, MU)
    a = np.abs(xs)
    s = ((a[..., 0] + a[..., 1]) + a[..., 2]) + a[..., 3]  # [M, T4p]
    mx = s.reshape(m, -1, u4).max(-1)  # [M, NU]
    with np.errstate(divide="ignore"):
        inv = np.where(mx > 0, np.float32(127) / mx, np.float32(0)).astype(np.float32)
    idx = np.arange(16)
    e = np.zeros((m, t4p, 16), np.float32)
    for j in range(MU):
        e = e + np.where((idx >> j) & 1, xs[..., j : j + 1], -xs[..., j : j + 1]).astype(np.float32)
    tab = np.rint(e * np.repeat(inv, u4, axis=1)[..., None]).astype(np.int8)
    return tab, (mx / np.float32(127)).astype(np.float32)


def lut_avx2_reference(x: np.ndarray, w: BCQWeight) -> np.ndarray:
    """The kernel's semantics in numpy (float64 after the int8 tables): the exact test reference."""
    m, k = x.shape
    q, n, _ = w.signs.shape
    d = dims(k, n, w.group)
    tab, ls = quantized_tables(x, w.group)
    t4p, u4, g4 = 2 * d["pairs"], d["u4"], d["g4"]
    sp = np.zeros((q, n, t4p * MU), np.int64)
    sp[:, :, :k] = w.signs
    code = (sp.reshape(q, n, t4p, MU) << np.arange(MU)).sum(-1)  # [q, N, T4p]
    y = np.zeros((m, n))
    for b in range(q):
        looked = np.take_along_axis(tab[:, None, :, :].astype(np.int64), code[b][None, :, :, None], 3)[..., 0]
        per_unit = looked.reshape(m, n, -1, u4).sum(-1)  # [M, N, NU] exact integers
        a = np.repeat(w.alpha[b].astype(np.float64), g4 // u4, axis=1)  # [N, NU]
        y += (per_unit * a[None] * ls[:, None, :]).sum(-1)
    if w.offset is not None:
        xp = np.zeros((m, d["ng"] * g4 * MU))
        xp[:, :k] = x
        gs = xp.reshape(m, d["ng"], -1).sum(-1)
        y += gs @ w.offset.T.astype(np.float64)
    return y


def int8_weights(w: BCQWeight) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights [N, NG*group], step [N, NG]) exactly as the int8 path dequantises them: per
    (row, group) S = sum_b |alpha_b|, a_b = rint(alpha_b * ((127 - q) / S)), wq = sum_b a_b s_b and
    step S / (127 - q) (so |wq| <= 127); float32 ops in the kernel's order."""
    q, n, k = w.signs.shape
    ng = -(-k // w.group)
    a = w.alpha.astype(np.float32)  # [q, N, NG]
    s = np.abs(a[0])
    for b in range(1, q):
        s = s + np.abs(a[b])
    lim = np.float32(127 - q)
    with np.errstate(divide="ignore"):
        inv = np.where(s > 0, lim / s, np.float32(0)).astype(np.float32)
    ai = np.rint(a * inv[None]).astype(np.int64)  # [q, N, NG]
    sp = np.zeros((q, n, ng * w.group), np.int64)
    sp[:, :, :k] = np.where(w.signs, 1, -1)
    wq = (sp.reshape(q, n, ng, w.group) * ai[..., None]).sum(0).reshape(n, -1)
    return wq.astype(np.int8), (s / lim).astype(np.float32)


def _groups(x: np.ndarray, group: int, dtype=np.float64) -> np.ndarray:
    """``x`` [M, K] as [M, NG, group], zero past K (how the kernels see a ragged last group)."""
    m, k = x.shape
    xp = np.zeros((m, -(-k // group) * group), dtype)
    xp[:, :k] = x
    return xp.reshape(m, -1, group)


def int8_activations(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 activations [M, NG*group], scales [M, NG]) as the int8 path quantises them: one scale
    max|x| / 127 per (row, group), rint(x * (127 / max)) (round half to even)."""
    xg = _groups(np.asarray(x, np.float32), group, np.float32)
    mx = np.abs(xg).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(mx > 0, np.float32(127) / mx, np.float32(0)).astype(np.float32)
    xq = np.rint(xg * inv[..., None]).reshape(len(xg), -1).astype(np.int8)
    return xq, (mx / np.float32(127)).astype(np.float32)


def int8_reference(x: np.ndarray, w: BCQWeight) -> np.ndarray:
    """The int8 path's semantics in numpy (exact integer dot products per group, then float64)."""
    m, k = x.shape
    n = w.shape[0]
    ng = -(-k // w.group)
    wq, step = int8_weights(w)
    xq, xs = int8_activations(x, w.group)
    dots = np.einsum("mgk,ngk->mng", xq.reshape(m, ng, -1).astype(np.int64), wq.reshape(n, ng, -1).astype(np.int64))
    y = (dots * xs[:, None, :].astype(np.float64) * step[None].astype(np.float64)).sum(-1)
    if w.offset is not None:
        y += _groups(x, w.group).sum(-1) @ w.offset.T.astype(np.float64)
    return y


def int8_error_bound(x: np.ndarray, w: BCQWeight) -> np.ndarray:
    """Upper bound of |int8 path - float reference| per output: weights off by at most q/2 steps,
    activations by half their scale."""
    n, q = w.shape[0], w.signs.shape[0]
    wq, step = int8_weights(w)
    _, xs = int8_activations(x, w.group)
    xa = _groups(np.abs(x), w.group).sum(-1)  # [M, NG]
    ng = xa.shape[1]
    wabs = np.abs(wq.astype(np.float64)).reshape(n, ng, -1).sum(-1) * step  # [N, NG]: sum |dequantised w|
    return xa @ (step.astype(np.float64) * (q / 2)).T + (xs.astype(np.float64) / 2) @ wabs.T


def table_error_bound(x: np.ndarray, w: BCQWeight) -> np.ndarray:
    """Upper bound of |kernel - float reference| per output, from rounding each table entry (≤ scale/2)."""
    m, k = x.shape
    d = dims(k, w.shape[0], w.group)
    _, ls = quantized_tables(x, w.group)
    a = np.abs(w.alpha).sum(0)  # [N, NG]
    a = np.repeat(a, d["g4"] // d["u4"], axis=1)  # [N, NU]
    return (ls * (d["u4"] / 2.0)) @ a.T.astype(np.float64)
