"""The AVX2 int8-table LUT-add kernel: a TIR wrapper around the C micro-kernel in kernels/lut_avx2.cc.

Why a C micro-kernel (call_extern) rather than LLVM intrinsics in TIR: the inner step needs exact
register allocation across planes and activation rows (16 ymm registers), nibble splitting and the
``vpunpck``/``vpmaddubsw`` widening, which TIR's vectoriser does not express; T-MAC made the same
choice. TIR keeps what it is good at: shapes (symbolic M), workspaces and the thread split (the
parallel loop runs on TVM's own thread pool, so nothing else competes for the cores).

This module holds the kernel's face: ISA checks, the knob space and defaults, the layout's dims and the
TIR wrapper. Beside it: lut_avx2_pack.py (the weight layout; bytes described in the header of
kernels/lut_avx2.cc), lut_avx2_reference.py (numpy references: the tables are int8, one scale per
unit of tables, T-MAC's scheme, so the result equals lut_avx2_reference to float rounding and the
float reference to within table_error_bound) and native.py (building and linking the C++ code).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..quant.bcq import MU

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
AVX2_KNOBS = Knobs(1, 1, 0)  # decode on a CPU without AVX-512: one row block per pass (the tuner's pick there)


def default_knobs(bits: int, vnni: bool = True, tied: bool = False) -> tuple[Knobs, Knobs]:
    """Untuned (decode, batch) knobs for a target with or without AVX-512 VNNI. With it: 512-bit LUT
    decode, int8 batch. Without it (AVX2 only): one row block per pass for the decode, and the LUT
    loop for the batch except at 4 untied bits, where the AVX2 int8 path won: the tuner's picks on
    the AVX2-only CPUs measured (docs/BENCHMARKS.md)."""
    if vnni:
        return DEFAULT_KNOBS, DEFAULT_BATCH_KNOBS
    return AVX2_KNOBS, (DEFAULT_BATCH_KNOBS if bits >= 4 and not tied else LUT_BATCH_KNOBS)


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


def row_interleaved(bits: int, tied: bool) -> bool:
    """Tied 4-bit codes are stored [NB, P, 32, 4] (a row's planes adjacent), not [NB, P, 4, 32]: the
    kernel then sums each row's planes by multiply-adds with (8, 4, 2, 1) instead of unpacking (fewer
    ops per code byte, so at M = 1 the arithmetic hides under the reads)."""
    return tied and bits == 4


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
