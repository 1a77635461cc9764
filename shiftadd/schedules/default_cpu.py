"""Default CPU schedules for the float operators our rewrite leaves (attention, norms, kept matmuls).

TVM's CPU pipeline fuses but does not schedule, so every operator would run as one serial loop nest.
:class:`CPUMatmul` takes float matmuls (with fused epilogues), dlight's CPU rules (GEMV,
Reduction) take what they match of the rest; :class:`CPUFallback` gives the rest a
parallel outer loop and, for reductions whose innermost spatial axis is wide, a vectorised
accumulator over that axis (the register-tiled form of a matmul). Tuning replaces these later.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

VEC = 16
MATMUL_ROWS, MATMUL_COLS = 4, 32  # register tile of CPUMatmul: rows of x sharing each loaded W vector


def _extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _open(rule, func, target):
    """(schedule, block infos with spatial producers inlined) for a PrimFunc this rule may schedule."""
    if not isinstance(func, tirx.PrimFunc) or not rule.is_target_available(target):
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    return sch, _try_inline(sch, infos)


def _try_inline(sch, infos):
    """dlight's try_inline, except that nothing is inlined after a reduction block: with a unit
    reduction extent, normalize_prim_func leaves the reduction looking spatial, and
    reverse_compute_inline then folds the epilogue into its init and update (wrong results: an
    RMSNorm over one column came out NaN)."""

    class _Guarded:
        def __init__(self, sch):
            self._sch = sch

        def compute_inline(self, block):
            return self._sch.compute_inline(block)

        def reverse_compute_inline(self, block):
            if any(self._sch.get(p).init is not None for p in self._sch.get_producers(block)):
                raise ValueError("a reduction block's epilogue stays a block of its own")
            return self._sch.reverse_compute_inline(block)

    return try_inline(_Guarded(sch), infos)


SERIAL_WORK = 16384  # loop iterations below which a thread-pool launch costs more than it saves


class SmallStatic(CPUScheduleRule):
    """Static PrimFuncs with little work (a one-token decode step's norms, RoPE, residual adds over
    576 values) stay serial: a parallel launch and barrier costs microseconds, the work less. It
    also keeps dlight's Reduction away from them: with every spatial extent 1 it recomputes a row's
    mean inside the parallel loop over the row (docs/ENGINEERING.md)."""

    def apply(self, func, target, _tunable):
        opened = _open(self, func, target)
        if opened is None:
            return None
        sch, infos = opened
        work = _work(sch, infos)
        return sch if work is not None and work <= SERIAL_WORK else None


def _work(sch, infos) -> int | None:
    """Loop iterations of all blocks (spatial producers inlined), or None if any extent is symbolic."""
    work = 0
    for info in infos:
        extents = [_extent(sch, lp) for lp in sch.get_loops(info.block_rv)]
        if any(e is None for e in extents):
            return None
        work += int(np.prod(extents, dtype=np.int64)) if extents else 1
    return work


def static_work(func) -> int | None:
    """:func:`_work` of a PrimFunc (None also when dlight cannot analyse it)."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    return None if infos is None else _work(sch, _try_inline(sch, infos))


class CPUMatmul(CPUScheduleRule):
    """Float matmuls (one reduction block ``C[m.., n] += A[m.., k] * B[k, n]``, constant N), fused
    epilogues included: a MATMUL_ROWS x MATMUL_COLS register tile, each vector of B reused by
    MATMUL_ROWS rows of A, tiles in parallel; epilogue blocks get a parallel loop of their own.
    dlight's cpu.Reduction also matches these but leaves the fused ones serial (docs/ENGINEERING.md)."""

    def apply(self, func, target, _tunable):
        opened = _open(self, func, target)
        if opened is None:
            return None
        sch, infos = opened
        red = [i for i in infos if "R" in i.dom_kind()]
        if len(red) != 1:
            return None
        info = red[0]
        kinds = info.dom_kind()
        if kinds.count("R") != 1 or not kinds.endswith("R") or "O" in kinds or len(kinds) < 3:
            return None
        block = info.block_rv
        if len(sch.get(block).reads) != 2:
            return None
        loops = sch.get_loops(block)
        s, r = loops[:-1], loops[-1]
        n_ext = _extent(sch, s[-1])
        if n_ext is None or n_ext < MATMUL_COLS:
            return None
        copies = []  # padded copies of the operands and the output
        # B with batch axes of its own (attention's q @ k^T, p @ v): tiles stay within one batch
        # entry, so every row of a tile reads the same B (fused across heads, a tile of a ragged
        # row count mixed two heads' rows and their B columns)
        per_batch = len(s) > 2 and len(sch.get(block).reads[1].region) > 2 and _extent(sch, s[-2]) is not None
        try:
            padding = [1] * len(kinds)
            if n_ext % MATMUL_COLS and _rows_reuse(sch, s[:-1]):
                # a ragged N (257 tokens of a ViT's attention) leaves the column tile a masked tail
                # that LLVM does not vectorise (17x slower); the operands are padded instead
                padding[len(s) - 1] = MATMUL_COLS
            if per_batch and _extent(sch, s[-2]) % MATMUL_ROWS:
                padding[len(s) - 2] = MATMUL_ROWS
            if padding != [1] * len(kinds):
                known = {sch.get(i.block_rv).name_hint for i in infos}
                sch.pad_einsum(block, padding)
                loops = sch.get_loops(block)
                s, r = loops[:-1], loops[-1]
                copies = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint not in known]
            if per_batch:
                outer = [sch.fuse(*s[:-2])] if len(s) > 3 else [s[0]]
                mo, mi = sch.split(s[-2], factors=[None, MATMUL_ROWS])
            else:
                outer = []
                mo, mi = sch.split(sch.fuse(*s[:-1]) if len(s) > 2 else s[0], factors=[None, MATMUL_ROWS])
            no, ni = sch.split(s[-1], factors=[None, MATMUL_COLS])
            sch.reorder(*outer, mo, no, r, mi, ni)
            sch.vectorize(ni)
            sch.unroll(mi)
            sch.parallel(sch.fuse(*outer, mo, no))
            sch.decompose_reduction(block, r)
            for other in infos:
                if other is not info:
                    CPUFallback._schedule_block(sch, other)
            for copy in copies:
                outer = sch.get_loops(copy)[:-1]
                if outer:
                    sch.parallel(sch.fuse(*outer))
        except Exception:  # noqa: BLE001 - not the shape this rule expects; the next rule takes it
            return None
        return sch


class CPUFallback(CPUScheduleRule):
    """Parallel outer spatial loop; vectorised innermost spatial axis under reductions."""

    def apply(self, func, target, _tunable):
        opened = _open(self, func, target)
        if opened is None:
            return None
        sch, infos = opened
        for info in infos:
            try:
                self._schedule_block(sch, info)
            except Exception:  # noqa: BLE001 - leave a block we cannot handle serial but correct
                continue
        return sch

    @staticmethod
    def _schedule_block(sch, info):
        block = info.block_rv
        loops = sch.get_loops(block)
        kinds = info.dom_kind()
        if not loops or len(kinds) != len(loops) or "O" in kinds:
            return
        s = [lp for lp, k in zip(loops, kinds) if k == "S"]
        r = [lp for lp, k in zip(loops, kinds) if k == "R"]
        if not s:
            return
        sch.reorder(*s, *r)
        inner = _extent(sch, s[-1])
        if r and inner is not None and inner >= VEC and inner % VEC == 0:
            # each reduction step streams a contiguous run of ``cols`` outputs' inputs (a row segment
            # of W in a GEMV): one 16-wide column panel per task read W at a stride of N floats per
            # step, starved of bandwidth (docs/ENGINEERING.md)
            cols = _stream_cols(inner)
            so, sm, si = sch.split(s[-1], factors=[None, cols // VEC, VEC])
            sch.reorder(*s[:-1], so, *r, sm, si)
            sch.vectorize(si)
            outer = sch.fuse(*s[:-1], so) if len(s) > 1 else so
            sch.parallel(outer)
            sch.decompose_reduction(block, r[0])
            return
        if not r and inner is not None and inner % VEC == 0:
            # injective blocks (activations, RoPE, slices, transposes, copies over the KV cache):
            # the innermost axis is static, so it runs in vectors; the parallel loop is over the
            # rest, so index arithmetic (divisions by symbolic extents) is paid per vector, not
            # per element
            so, si = sch.split(s[-1], factors=[None, VEC])
            sch.vectorize(si)
            s = [*s[:-1], so]
        lead = _fusable_prefix(sch, s)
        outer = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        sch.parallel(outer)
        if r:
            sch.decompose_reduction(block, r[0])


def _rows_reuse(sch, row_loops, least: int = 8) -> bool:
    """Whether each column of B serves at least ``least`` rows (a symbolic row count is taken to):
    padding B's columns copies B, which a one-token step would pay for every call."""
    rows = 1
    for lp in row_loops:
        ext = _extent(sch, lp)
        if ext is None:
            return True
        rows *= ext
    return rows >= least


def _stream_cols(n: int, most: int = 512, tasks: int = 8) -> int:
    """Columns per reduction step: a multiple of VEC dividing ``n``, at most ``most`` (the partial
    sums stay in L1), leaving at least ``tasks`` column blocks to share between threads."""
    cols = most
    while cols > VEC and (n % cols or n // cols < tasks):
        cols //= 2
    return max(cols, VEC)


def _fusable_prefix(sch, loops):
    """The leading loops to fuse into one parallel loop: up to the first whose extent is a compound
    symbolic expression (``past + seq`` in a KV-cached decode step). Fusing across one makes every
    index a chain of divisions by that expression, and LLVM then needs seconds per kernel for no
    run-time gain (docs/ENGINEERING.md)."""
    lead = [loops[0]]
    for lp in loops[1:]:
        ext = sch.get(lp).extent
        if not isinstance(ext, (tirx.IntImm, tirx.Var)):
            break
        lead.append(lp)
    return lead


def schedule_unscheduled(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Schedule every PrimFunc not marked ``tirx.is_scheduled`` (our kernels are)."""
    return dl.ApplyDefaultSchedule(*rules())(mod)


class RowReduction(CPUScheduleRule):
    """Norms and softmaxes over the last axis (dlight's cpu.Reduction) with their elementwise
    producers inlined first: a cast or square left as a block of its own (the weight's cast in a
    legalized RMSNorm has one axis) made dlight parallelise the batch axis alone, so a prompt's
    rows ran on one core (docs/ENGINEERING.md)."""

    def apply(self, func, target, tunable):
        opened = _open(self, func, target)
        if opened is None:
            return None
        sch, _ = opened
        return dl.cpu.Reduction().apply(sch.mod["main"], target, tunable)


def rules() -> list:
    """The default rules, first match wins (also the baseline MetaSchedule must beat: float_tuning)."""
    return [SmallStatic(), CPUMatmul(), dl.cpu.GEMV(), RowReduction(), CPUFallback()]
