"""CPU kernels for attention over the KV cache: scores ``q @ k^T`` and values ``p @ v`` read the
cache layout ``[B, H, N, D]`` in place, and a softmax with the attention mask's add fused in.

Why: with the cache length N symbolic no schedule rule vectorises these operators, and MetaSchedule
cannot tune them (it keys workloads by static shapes). Exported attention transposes the keys
(``permute_dims(k, [0, 1, 3, 2])``) and multiplies by the copy, each score walking it at a stride of
N floats. The scores kernel takes each score as a dot product over D contiguous floats of one key
row (:func:`lanes_for` partial sums in one vector register, then a horizontal add), in tasks of
``block`` keys. The values kernel accumulates whole value rows (D contiguous floats) per query row.
The softmax kernel adds the mask, takes the row maximum, the exponentials and their sum in one pass
over each row; legalized, the mask add and the softmax were two parallel operators. Timings of
both forms: docs/ENGINEERING.md.

Each kernel has one knob (:data:`KINDS`): scores, keys per parallel task; values, value columns per
task; softmax, rows per task (0: one serial loop, no thread-pool launch). ``shiftadd tune`` times
every candidate at the query rows the model's calls use and at several cache lengths (tuning/search.py
``measure``), since one compiled kernel serves every length; the best goes into the tuning database
(key: kind, heads, head size, dtype, mask shape and this file's hash).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tvm
from tvm import s_tir, te

LANES = 16  # softmax: partial maxima and sums per vector lane
LENGTHS = (64, 256, 1024)  # cache lengths every candidate is timed at
PROMPT = 0  # query rows of a call whose row count is symbolic (a prefill): timed at M = N <= PROMPT_MAX
PROMPT_MAX = 256
SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]  # tuning keys: stale on change


class AttentionKernel(NamedTuple):
    """One kernel a model needs. ``d``: head size (0 for softmax). ``bias``: softmax's fused mask,
    "" for none, else its broadcast over (batch, heads, rows): "x" full, "1" broadcast, e.g. "111"
    for a ``[1, 1, 1, N]`` mask."""

    kind: str
    heads: int
    d: int
    dtype: str
    bias: str = ""

    @property
    def name(self) -> str:
        return f"shiftadd_{self.kind}_h{self.heads}_d{self.d}_{self.dtype}" + (f"_m{self.bias}" if self.bias else "")


def lanes_for(d: int) -> int:
    """Vector width of the partial sums: the widest of 16/8/4/2 floats that divides ``d`` at least
    twice (a loop of one step would be dropped by the schedule); 1 (a plain dot product) if none."""
    return next((w for w in (16, 8, 4, 2) if d % w == 0 and d // w >= 2), 1)


def scores_kernel(heads: int, d: int, dtype: str = "float32", block: int = 16) -> tvm.tirx.PrimFunc:
    """``scores[b, h, m, n] = sum_d q[b, h, m, d] * k[b, h, n, d]`` for any batch B, query rows M and
    keys N (symbolic; bound from the arguments' shapes), ``heads`` and ``d`` fixed. ``k`` may hold
    more rows than N (a preallocated cache: N comes from the output). Scheduled, and opaque to
    fusion (an epilogue fused in would be rescheduled by the generic rules)."""
    if heads < 1 or d < 1 or block < 1:
        raise ValueError(f"scores_kernel: heads, d and block must be positive (got {heads}, {d}, {block})")
    lanes = lanes_for(d)
    bsz, m, n = te.var("batch", "int64"), te.var("m", "int64"), te.var("n", "int64")
    q = te.placeholder((bsz, heads, m, d), dtype, name="q")
    k = te.placeholder((bsz, heads, te.var("capacity", "int64"), d), dtype, name="k")  # rows >= n
    if lanes == 1:
        r = te.reduce_axis((0, d), name="r")
        out = te.compute(
            (bsz, heads, m, n), lambda b, h, i, j: te.sum(q[b, h, i, r] * k[b, h, j, r], axis=r), name="scores"
        )
    else:
        c = te.reduce_axis((0, d // lanes), name="c")
        part = te.compute(
            (bsz, heads, m, n, lanes),
            lambda b, h, i, j, v: te.sum(q[b, h, i, c * lanes + v] * k[b, h, j, c * lanes + v], axis=c),
            name="part",
        )
        l_ax = te.reduce_axis((0, lanes), name="l")
        out = te.compute(
            (bsz, heads, m, n), lambda b, h, i, j: te.sum(part[b, h, i, j, l_ax], axis=l_ax), name="scores"
        )
    sch = s_tir.Schedule(te.create_prim_func([q, k, out]))
    blk = sch.get_sblock("scores")
    b, h, i, j, lr = sch.get_loops(blk)
    jo, ji = sch.split(j, factors=[None, block])
    sch.reorder(jo, b, h, ji, i, lr)  # one key row stays in L1 while every query row of its head uses it
    sch.parallel(jo)
    if lanes > 1:
        pb = sch.get_sblock("part")
        sch.compute_at(pb, i)
        *_, ls, cr = sch.get_loops(pb)
        sch.reorder(cr, ls)
        sch.vectorize(ls)
        sch.decompose_reduction(pb, cr)
    sch.decompose_reduction(blk, lr)
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


def values_kernel(heads: int, d: int, dtype: str = "float32", cols: int = 0) -> tvm.tirx.PrimFunc:
    """``out[b, h, m, :] = sum_n p[b, h, m, n] * v[b, h, n, :]`` for any B, M, N (symbolic), ``heads``
    and ``d`` fixed: each task accumulates ``cols`` contiguous value columns (0: all ``d``) of one
    query row over every key, vectorised over the columns. ``v`` may hold more rows than N (a
    preallocated cache: N comes from ``p``). Scheduled, opaque to fusion."""
    cols = cols or d
    if heads < 1 or d < 1 or cols < 1 or d % cols:
        raise ValueError(f"values_kernel: heads and d must be positive and cols divide d (got {heads}, {d}, {cols})")
    bsz, m, n = te.var("batch", "int64"), te.var("m", "int64"), te.var("n", "int64")
    p = te.placeholder((bsz, heads, m, n), dtype, name="p")
    v = te.placeholder((bsz, heads, te.var("capacity", "int64"), d), dtype, name="v")  # rows >= n
    r = te.reduce_axis((0, n), name="r")
    out = te.compute(
        (bsz, heads, m, d), lambda b, h, i, c: te.sum(p[b, h, i, r] * v[b, h, r, c], axis=r), name="values"
    )
    sch = s_tir.Schedule(te.create_prim_func([p, v, out]))
    blk = sch.get_sblock("values")
    b, h, i, c, r = sch.get_loops(blk)
    co, ci = sch.split(c, factors=[None, cols])
    sch.reorder(b, h, co, i, r, ci)
    sch.parallel(sch.fuse(b, h, co, i))
    sch.vectorize(ci)
    sch.decompose_reduction(blk, r)
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


def softmax_kernel(heads: int, dtype: str = "float32", rows: int = 1, bias: str = "") -> tvm.tirx.PrimFunc:
    """``softmax(x + mask, axis=-1)`` over ``x [B, heads, M, N]`` (B, M, N symbolic) and a ``mask``
    broadcast as ``bias`` says (see AttentionKernel; "" for no mask): per row the maximum, the
    exponentials (kept) and their sum, then one scaling pass; float16 is computed in float32. Tasks
    of ``rows`` rows in parallel; 0 runs one serial loop. Scheduled, opaque to fusion."""
    if heads < 1 or rows < 0 or (bias and (len(bias) != 3 or set(bias) - {"x", "1"})):
        raise ValueError(
            f"softmax_kernel: heads must be positive, rows >= 0 and bias '' or 3 of 'x'/'1' "
            f"(got {heads}, {rows}, {bias!r})"
        )
    bsz, m, n = te.var("batch", "int64"), te.var("m", "int64"), te.var("n", "int64")
    x = te.placeholder((bsz, heads, m, n), dtype, name="x")
    args = [x]
    acc = "float32"
    if bias:
        mask = te.placeholder(
            tuple(e if f == "x" else 1 for f, e in zip(bias, (bsz, heads, m))) + (n,), dtype, name="mask"
        )
        args.append(mask)

        def val(b, h, i, j):
            idx = [e if f == "x" else 0 for f, e in zip(bias, (b, h, i))]
            return (x[b, h, i, j] + mask[idx[0], idx[1], idx[2], j]).astype(acc)
    else:

        def val(b, h, i, j):
            return x[b, h, i, j].astype(acc)

    # the row's maximum and sum as LANES partial results over its whole vectors, plus its tail: one
    # serial chain of float adds (LLVM keeps their order) was the kernel's critical path. The
    # reductions keep their init inside the loop (decompose_reduction needs affine bindings), so
    # a loop of no steps leaves its result unset: selects on the step counts discard it
    full, tail = n // LANES, n % LANES
    lo = tvm.tirx.min_value(acc)

    def lane_max(b, h, i, lane):
        c = te.reduce_axis((0, full), name="c")
        return te.max(val(b, h, i, c * LANES + lane), axis=c)

    part_max = te.compute((bsz, heads, m, LANES), lane_max, name="part_max")
    t = te.reduce_axis((0, tail), name="t")
    tail_max = te.compute(
        (bsz, heads, m), lambda b, h, i: te.max(val(b, h, i, full * LANES + t), axis=t), name="tail_max"
    )
    lm = te.reduce_axis((0, LANES), name="lm")
    lanes_max = te.compute((bsz, heads, m), lambda b, h, i: te.max(part_max[b, h, i, lm], axis=lm), name="lanes_max")
    row_max = te.compute(
        (bsz, heads, m),
        lambda b, h, i: te.max(
            tvm.tirx.Select(full > 0, lanes_max[b, h, i], lo), tvm.tirx.Select(tail > 0, tail_max[b, h, i], lo)
        ),
        name="row_max",
    )
    ex = te.compute((bsz, heads, m, n), lambda b, h, i, k: te.exp(val(b, h, i, k) - row_max[b, h, i]), name="row_exp")

    def lane_sum(b, h, i, lane):
        c = te.reduce_axis((0, full), name="c2")
        return te.sum(ex[b, h, i, c * LANES + lane], axis=c)

    part_sum = te.compute((bsz, heads, m, LANES), lane_sum, name="part_sum")
    t2 = te.reduce_axis((0, tail), name="t2")
    tail_sum = te.compute(
        (bsz, heads, m), lambda b, h, i: te.sum(ex[b, h, i, full * LANES + t2], axis=t2), name="tail_sum"
    )
    ls = te.reduce_axis((0, LANES), name="ls")
    lanes_sum = te.compute((bsz, heads, m), lambda b, h, i: te.sum(part_sum[b, h, i, ls], axis=ls), name="lanes_sum")
    zero = tvm.tirx.const(0.0, acc)
    inv = te.compute(
        (bsz, heads, m),
        lambda b, h, i: (
            1.0
            / (tvm.tirx.Select(full > 0, lanes_sum[b, h, i], zero) + tvm.tirx.Select(tail > 0, tail_sum[b, h, i], zero))
        ),
        name="row_inv",
    )
    out = te.compute(
        (bsz, heads, m, n), lambda b, h, i, k: (ex[b, h, i, k] * inv[b, h, i]).astype(dtype), name="softmax"
    )
    sch = s_tir.Schedule(te.create_prim_func(args + [out]))
    b, h, i, _ = sch.get_loops(sch.get_sblock("softmax"))
    order = ("row_inv", "lanes_sum", "tail_sum", "part_sum", "row_exp", "row_max", "lanes_max", "tail_max", "part_max")
    for name in order:  # under the row loop while the bindings are affine (vectorize needs that)
        sch.compute_at(sch.get_sblock(name), i)
    for name in ("part_max", "part_sum"):
        *_, lane, c = sch.get_loops(sch.get_sblock(name))
        sch.reorder(c, lane)
        sch.vectorize(lane)
    row = sch.fuse(b, h, i)
    if rows:
        sch.parallel(sch.split(row, factors=[None, rows])[0])
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


# kind -> (knob name, default knob for head size d, candidates for d, builder(spec, knob)). The
# defaults (values: one task per query row, whole rows; softmax: one row per task, not serial) are
# what won on SmolLM2's shapes (docs/ENGINEERING.md, docs/BENCHMARKS.md).
KINDS = {
    "scores": (
        "block",
        lambda d: 16,
        lambda d: (4, 8, 16, 32, 64),
        lambda s, k: scores_kernel(s.heads, s.d, s.dtype, k),
    ),
    "values": (
        "cols",
        lambda d: d,
        lambda d: tuple(c for c in (d, d // 2, d // 4) if c >= 8 and d % c == 0) or (d,),
        lambda s, k: values_kernel(s.heads, s.d, s.dtype, k),
    ),
    "softmax": (
        "rows",
        lambda d: 1,
        lambda d: (0, 1, 2, 4, 8),
        lambda s, k: softmax_kernel(s.heads, s.dtype, k, s.bias),
    ),
}


def default_knob(spec: AttentionKernel) -> int:
    return KINDS[spec.kind][1](spec.d)


def candidates(spec: AttentionKernel) -> tuple[int, ...]:
    return KINDS[spec.kind][2](spec.d)


def kernel(spec: AttentionKernel, knob: int | None = None) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of ``spec`` with ``knob`` (None: the default)."""
    if spec.kind not in KINDS:
        raise ValueError(f"attention kernel kind {spec.kind!r}: expected one of {', '.join(KINDS)}")
    return KINDS[spec.kind][3](spec, default_knob(spec) if knob is None else int(knob))


def timing_cases(rows, lengths=LENGTHS) -> list[tuple[int, int]]:
    """(query rows M, keys N) a kernel called with ``rows`` is timed at (see tuning/search.py ``measure``)."""
    return list(
        dict.fromkeys((m or n, n) for m in sorted(set(rows)) for n in lengths if m != PROMPT or n <= PROMPT_MAX)
    )


def arrays(spec: AttentionKernel, m: int, n: int, rng) -> list[np.ndarray]:
    """Arguments (inputs, then a zero output; batch 1) of one call of ``spec`` at ``m`` query rows
    and ``n`` keys, as numpy arrays."""
    h, d, dt = spec.heads, spec.d, spec.dtype
    if spec.kind == "scores":
        shapes, out = [(1, h, m, d), (1, h, n, d)], (1, h, m, n)
    elif spec.kind == "values":
        shapes, out = [(1, h, m, n), (1, h, n, d)], (1, h, m, d)
    else:
        shapes = [(1, h, m, n)] + (
            [tuple(1 if f == "1" else e for f, e in zip(spec.bias, (1, h, m))) + (n,)] if spec.bias else []
        )
        out = (1, h, m, n)
    return [rng.standard_normal(s).astype(dt) for s in shapes] + [np.zeros(out, dt)]
