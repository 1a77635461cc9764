"""The AVX2 int8-table LUT-add kernel: a TIR wrapper around the C micro-kernel in kernels/lut_avx2.cc.

Why a C micro-kernel (call_extern) rather than LLVM intrinsics in TIR: the inner step needs exact
register allocation across planes and activation rows (16 ymm registers), nibble splitting and the
``vpunpck``/``vpmaddubsw`` widening, which TIR's vectoriser does not express; T-MAC made the same
choice. TIR keeps what it is good at: shapes (symbolic M), workspaces and the thread split (the
parallel loop runs on TVM's own thread pool, so nothing else competes for the cores).

Layout (:func:`pack_avx2`): see the header of kernels/lut_avx2.cc. Semantics differ from the float
kernel in one documented way: the tables are int8 (one scale per unit of tables, T-MAC's scheme), so
the result equals :func:`lut_avx2_reference` to float rounding, and the float reference to within
:func:`table_error_bound`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..quant.bcq import MU, BCQWeight, plane_weights
from ..quant.pack import _exact_f16, _shared_rows

SOURCE = Path(__file__).with_name("kernels") / "lut_avx2.cc"  # includes the kernels/*.h: kernel_sources()
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-ffp-contract=off", "-std=c++17"]
ROWS = 32  # output rows per vpshufb
MAX_UNIT_PAIRS = 128  # int16 accumulation bound: 128 pairs x 254 < 32767
FEATURES = ("avx2", "fma", "f16c")


@dataclass(frozen=True)
class Knobs:
    """Tuning knobs of one kernel: activation rows per pass, 32-row blocks per pass, thread split,
    and the path: 0 = LUT-add on 256-bit registers, 1 = dequantise-to-int8 GEMM (AVX-512 VNNI, else
    AVX2 with at most 4 rows per pass; rbk unused), 2 = LUT-add on 512-bit registers (AVX-512 BW;
    mt 1). On a CPU without AVX-512 path 2 runs as path 0; with SHIFTADD_NO_INT8 path 1 runs as path
    0 with mt <= 2, rbk 1."""

    mt: int = 1
    rbk: int = 1
    tasks: int = 0  # 0: every thread of TVM's pool; 1: the calling thread alone (no wake-up)
    path: int = 0

    def tag(self) -> str:
        if self.path == 1:
            return f"i8m{self.mt}t{self.tasks}"
        return f"{'w' if self.path == 2 else ''}m{self.mt}r{self.rbk}t{self.tasks}"


KNOB_SPACE = (
    [
        Knobs(mt, rbk, t) for mt, rbk in ((1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (4, 1)) for t in (0, 1)
    ]  # the (mt, rbk) pairs the micro-kernel instantiates
    + [Knobs(mt, 1, t, 1) for mt in (2, 4, 6) for t in (0, 1)]  # the int8 path's rows per pass
    + [Knobs(1, rbk, t, 2) for rbk in (1, 2, 4) for t in (0, 1)]
)  # the 512-bit LUT path
# untuned defaults: 4 row blocks per pass keep 4 weight streams in flight, on 512-bit registers where
# the CPU has them; for M > 1 the int8 path, 4 rows per pass (the LUT path's cost grows with every
# activation row; the int8 path's does not grow with the planes). Timings: docs/ENGINEERING.md
DEFAULT_KNOBS = Knobs(1, 4, 0, 2)
DEFAULT_BATCH_KNOBS = Knobs(4, 1, 0, 1)
LUT_BATCH_KNOBS = Knobs(2, 1, 0)  # M > 1 kept on the LUT path (compile int8_batch=False), untuned


def default_knobs(bits: int, vnni: bool = True) -> tuple[Knobs, Knobs]:
    """Untuned (decode, batch) knobs for a target with or without AVX-512 VNNI. The batch takes the
    int8 path, except without VNNI at <= 3 bits: there its AVX2 version lost to the LUT loop in every
    tuning at M = 32 (docs/BENCHMARKS.md)."""
    return DEFAULT_KNOBS, (DEFAULT_BATCH_KNOBS if vnni or bits >= 4 else LUT_BATCH_KNOBS)


AVX512_FEATURES = ("avx512f", "avx512bw", "avx512vnni")
SWITCHES = ("SHIFTADD_NO_AVX512", "SHIFTADD_NO_INT8")  # environment switches the micro-kernel reads


def switch_on(name: str) -> bool:
    """Whether the micro-kernel reads switch ``name`` as set (as its env_on does: set, not empty,
    not starting with "0")."""
    v = os.environ.get(name, "")
    return bool(v) and v[0] != "0"


def target_supported(target) -> bool:
    """True when ``target`` (a TVM llvm Target) has AVX2, FMA and F16C."""
    from tvm.target import codegen

    try:
        return target.kind.name == "llvm" and bool(codegen.target_has_features(list(FEATURES), target))
    except Exception:  # noqa: BLE001 - a non-x86 target has no such features
        return False


def paths_supported(target) -> frozenset[int]:
    """The paths (Knobs.path) ``target`` (a TVM llvm Target with AVX2) runs: 0 and 1 (the int8 path,
    on AVX2 or AVX-512 VNNI) always, 2 with AVX-512 F/BW."""
    from tvm.target import codegen

    def has(*feats):
        try:
            return bool(codegen.target_has_features(list(feats), target))
        except Exception:  # noqa: BLE001 - a non-x86 target has no such features
            return False

    wide = target_supported(target) and has("avx512f", "avx512bw")
    return frozenset({0, 1} | ({2} if wide else set()))


def unit_tables(g4: int) -> int | None:
    """Tables per int8 scale: the largest even divisor of ``g4`` within the int16 bound (None: g4 odd)."""
    if g4 % 2:
        return None
    best = 2
    for u in range(2, min(g4, 2 * MAX_UNIT_PAIRS) + 1, 2):
        if g4 % u == 0:
            best = u
    return best


def supports(group: int, alpha_rows: int) -> bool:
    """Whether this kernel reads that layout (even tables per group; block scales over 32-row blocks)."""
    return group % (2 * MU) == 0 and (alpha_rows == 1 or alpha_rows % ROWS == 0)


def dims(k: int, n: int, group: int, alpha_rows: int = 1) -> dict:
    g4 = group // MU
    t4 = -(-k // MU)
    ng = -(-t4 // g4)
    nb = -(-n // ROWS)
    u4 = unit_tables(g4)
    return {
        "g4": g4,
        "ng": ng,
        "pairs": ng * g4 // 2,
        "u4": u4,
        "nu": ng * g4 // u4,
        "nb": nb,
        "nba": nb if alpha_rows == 1 else -(-nb * ROWS // alpha_rows),
        "w": ROWS if alpha_rows == 1 else 1,
    }


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


def row_interleaved(bits: int, tied: bool) -> bool:
    """Tied 4-bit codes are stored [NB, P, 32, 4] (a row's planes adjacent), not [NB, P, 4, 32]: the
    kernel then sums each row's planes by multiply-adds with (8, 4, 2, 1) instead of unpacking (fewer
    ops per code byte, so at M = 1 the arithmetic hides under the reads)."""
    return tied and bits == 4


def pack_avx2(w: BCQWeight, fp8: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """codes uint8 [NB, P, q, 32] ([NB, P, 32, 4] for tied 4-bit: :func:`row_interleaved`), alpha f16
    [NBA, NG, q, W] ([NBA, NG, 1, W] for tied scales: plane 0's only), offsets f16 [NBA, NG, W] ([1, 1, W]
    zeros without offset): the order the kernel streams them in (kernels/lut_avx2.cc). ``fp8`` stores
    scales and offsets as float8 e5m2 bytes (they must be e5m2 values)."""
    codes, alpha, zoff = _pack(w)
    if fp8:
        return codes, e5m2_bytes(alpha, "scale"), e5m2_bytes(zoff, "offset")
    return codes, alpha, zoff


def random_packed(
    k: int,
    n: int,
    bits: int,
    group: int,
    offset: bool = True,
    rows: int = 1,
    fp8: bool = False,
    rng=None,
    tied: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed random weights of a shape (random signs; scales 2^-6 (tied: 2^-6 2^-b) and offsets 2^-8,
    exact in every scale format): what timing needs, for the tuner and the benchmarks alike."""
    rng = rng if rng is not None else np.random.default_rng(0)
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


# -- building and linking the micro-kernel ---------------------------------------------------------
def kernel_sources() -> list[Path]:
    """The micro-kernel's files, sorted by name: SOURCE (the one translation unit the build compiles)
    and every header beside it that it includes (quoted includes: found beside it, no -I needed)."""
    return sorted([SOURCE, *SOURCE.parent.glob("*.h")], key=lambda p: p.name)


def _cache_dir() -> Path:
    """Where the compiled micro-kernel lives: keyed by all its sources (each name and content, so
    editing a header or moving code between files makes a new key) and CFLAGS."""
    base = Path(os.environ.get("SHIFTADD_CACHE", Path.home() / ".cache" / "shiftadd"))
    h = hashlib.sha256()
    for p in kernel_sources():
        data = p.read_bytes()
        h.update(f"{p.name}\0{len(data)}\0".encode() + data)
    h.update(" ".join(CFLAGS).encode())
    key = h.hexdigest()[:16]
    return base / "kernels" / key


def compile_once(out: Path, shared: bool, source: Path = SOURCE, compiler: list[str] | None = None) -> Path:
    """``source`` compiled to ``out`` (a shared library or an object file) unless it is there already:
    written to a temporary name, then renamed, so a crash never leaves half a file. ``compiler``: the
    command and flags (default $CXX with CFLAGS, for the micro-kernel)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + f".tmp{os.getpid()}")
    cmd = [
        *(compiler or [os.environ.get("CXX", "g++"), *CFLAGS]),
        "-shared" if shared else "-c",
        str(source),
        "-o",
        str(tmp),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


@lru_cache(maxsize=1)
def object_file() -> str:
    """The micro-kernel compiled to an object file, linked into every exported .so (export_library addons)."""
    return str(compile_once(_cache_dir() / "lut_avx2.o", shared=False))


@lru_cache(maxsize=1)
def load_in_process() -> str:
    """Load the micro-kernel into this process (RTLD_GLOBAL) so in-memory executables resolve it
    (an unresolved call_extern in TVM's JIT crashes the interpreter instead of raising)."""
    import tvm  # noqa: F401  (the kernel calls TVM's thread pool: libtvm_runtime must be loaded first)

    path = str(compile_once(_cache_dir() / "liblut_avx2.so", shared=True))
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return path


def _path_bits() -> int:
    return ctypes.CDLL(load_in_process()).shiftadd_paths()


def active_paths() -> frozenset[int]:
    """The paths the micro-kernel takes here when asked to (this CPU's features; ``SHIFTADD_NO_AVX512``
    set turns path 2 off, ``SHIFTADD_NO_INT8`` path 1): a call with another path computes path 0's
    result. The kernel reads the variables once per process and again at each call of this function."""
    bits = _path_bits()
    return frozenset(p for p, b in ((0, 1), (1, 2), (2, 4)) if bits & b)


def int8_isa() -> str | None:
    """Which registers the int8 path (path 1) runs on here: "avx512-vnni", "avx2", or None when
    ``SHIFTADD_NO_INT8`` turns it off (both compute the same integers, so the same result)."""
    bits = _path_bits()
    return None if not bits & 2 else "avx512-vnni" if bits & 8 else "avx2"


# -- the TIR wrapper --------------------------------------------------------------------------------
def make_lut_avx2(
    k: int,
    n: int,
    bits: int,
    group: int,
    offset: bool = True,
    alpha_rows: int = 1,
    knobs: Knobs = DEFAULT_KNOBS,
    knobs_batch: Knobs | None = None,
    fp8: bool = False,
    tied: bool = False,
):
    """PrimFunc ``(x [M, k] f32, codes, alpha, zoff) -> y [M, n] f32`` for the packed layout of :func:`pack_avx2`
    (``fp8``: scales as float8 e5m2 bytes): one micro-kernel call, which launches its tasks on TVM's thread pool
    (tables split over tasks, a barrier, then 32-row blocks split over tasks). ``knobs`` serve M = 1 (decode),
    ``knobs_batch`` M > 1 (prefill; defaults to ``knobs``). ``tied``: one scale per row and group, plane b's being it
    times 2^-b (quant.bcq.plane_weights)."""
    from tvm.script import tirx as T

    if not supports(group, alpha_rows):
        raise ValueError(f"AVX2 kernel: unsupported group {group} / rows per scale {alpha_rows}")
    kb = knobs_batch or (DEFAULT_BATCH_KNOBS if knobs == DEFAULT_KNOBS else knobs)
    d = dims(k, n, group, alpha_rows)
    nb, pairs, ng, g4, u4, nu, nba, wd = (d[x] for x in ("nb", "pairs", "ng", "g4", "u4", "nu", "nba", "w"))
    t4p = 2 * pairs
    q = bits
    il = row_interleaved(bits, tied)
    zshape = (nba, ng, wd) if offset else (1, 1, wd)
    use_z = int(offset)
    sdt = "uint8" if fp8 else "float16"
    i64 = T.int64

    def call(m, kn, X, codes, alpha, zoff, tab, ls, gs, Y):
        return T.call_extern(
            "int32",
            "shiftadd_lut_matmul",
            X.data,
            m,
            i64(k),
            codes.data,
            alpha.data,
            zoff.data,
            i64(use_z),
            i64(n),
            i64(pairs),
            i64(u4),
            i64(g4),
            i64(ng),
            i64(alpha_rows),
            i64(int(fp8) | 2 * int(tied) | 4 * int(il)),
            i64(q),
            i64(kn.mt),
            i64(kn.rbk),
            i64(kn.path),
            i64(kn.tasks),
            tab.data,
            ls.data,
            gs.data,
            Y.data,
        )

    @T.prim_func
    def lut8(
        x_h: T.handle,
        codes: T.Buffer((nb, pairs, ROWS, q) if il else (nb, pairs, q, ROWS), "uint8"),
        alpha: T.Buffer((nba, ng, 1 if tied else q, wd), sdt),
        zoff: T.Buffer(zshape, sdt),
        y_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        X = T.match_buffer(x_h, (m, k), "float32")
        Y = T.match_buffer(y_h, (m, n), "float32")
        tab = T.decl_buffer((m * t4p * 16,), "int8")
        ls = T.decl_buffer((m * nu,), "float32")
        gs = T.decl_buffer((m * ng,), "float32")
        # the micro-kernel returns -1 for a plane count or knob it was not built for: fail loudly
        if m == 1:
            assert call(m, knobs, X, codes, alpha, zoff, tab, ls, gs, Y) == 0, (
                "shiftadd_lut_matmul: unsupported bits or knobs"
            )
        else:
            assert call(m, kb, X, codes, alpha, zoff, tab, ls, gs, Y) == 0, (
                "shiftadd_lut_matmul: unsupported bits or knobs"
            )

    return lut8.with_attr({"op_pattern": 8, "tirx.is_scheduled": True})


def export(ex, path: str, **kwargs) -> None:
    """``ex.export_library`` with the micro-kernel linked in."""
    ex.export_library(path, addons=[object_file()], **kwargs)
