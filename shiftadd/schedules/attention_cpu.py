"""CPU kernel for attention scores ``q @ k^T`` read straight from the cache layout ``k [B, H, N, D]``.

Why: exported attention transposes the keys (``permute_dims(k, [0, 1, 3, 2])``) and multiplies by
the copy. With the cache length N symbolic, no schedule rule vectorises that matmul: each score
walked the transposed copy at a stride of N floats (SmolLM2 decode, N = 129: transpose 7 us +
matmul 41 us per layer). Here each score is a dot product over D contiguous floats of one key row:
:func:`lanes_for` partial sums in one vector register (D / lanes steps), then a horizontal add;
tasks are blocks of ``BLOCK`` keys (N is the only axis that grows with the context): 7 us.

The block size is this kernel's knob: ``shiftadd tune`` times every size of ``BLOCKS`` at the query
rows the model's calls use and at several cache lengths (:func:`measure_blocks`), since N is
symbolic and one compiled kernel serves every length; the best goes into the tuning database.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tvm
from tvm import s_tir, te

BLOCK = 16  # keys per parallel task (default without a tuned entry)
BLOCKS = (4, 8, 16, 32, 64)  # the knob's search space
LENGTHS = (64, 256, 1024)  # cache lengths a block size is timed at
SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]  # tuning keys: stale on change


def lanes_for(d: int) -> int:
    """Vector width of the partial sums: the widest of 16/8/4/2 floats that divides ``d`` at least
    twice (a loop of one step would be dropped by the schedule); 1 (a plain dot product) if none."""
    return next((w for w in (16, 8, 4, 2) if d % w == 0 and d // w >= 2), 1)


def scores_kernel(heads: int, d: int, dtype: str = "float32", block: int = BLOCK) -> tvm.tirx.PrimFunc:
    """``scores[b, h, m, n] = sum_d q[b, h, m, d] * k[b, h, n, d]`` for any batch B, query rows M and
    keys N (symbolic; bound from the arguments' shapes), ``heads`` and ``d`` fixed. Scheduled,
    and opaque to fusion (an epilogue fused in would be rescheduled by the generic rules)."""
    if heads < 1 or d < 1 or block < 1:
        raise ValueError(f"scores_kernel: heads, d and block must be positive (got {heads}, {d}, {block})")
    lanes = lanes_for(d)
    bsz, m, n = te.var("batch", "int64"), te.var("m", "int64"), te.var("n", "int64")
    q = te.placeholder((bsz, heads, m, d), dtype, name="q")
    k = te.placeholder((bsz, heads, n, d), dtype, name="k")
    if lanes == 1:
        r = te.reduce_axis((0, d), name="r")
        out = te.compute((bsz, heads, m, n), lambda b, h, i, j: te.sum(q[b, h, i, r] * k[b, h, j, r], axis=r),
                         name="scores")
    else:
        c = te.reduce_axis((0, d // lanes), name="c")
        part = te.compute((bsz, heads, m, n, lanes),
                          lambda b, h, i, j, l: te.sum(q[b, h, i, c * lanes + l] * k[b, h, j, c * lanes + l], axis=c),
                          name="part")
        l_ax = te.reduce_axis((0, lanes), name="l")
        out = te.compute((bsz, heads, m, n), lambda b, h, i, j: te.sum(part[b, h, i, j, l_ax], axis=l_ax),
                         name="scores")
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


def measure_blocks(heads: int, d: int, dtype: str, rows=(1,), target=None, rounds: int = 30,
                   blocks=BLOCKS, lengths=LENGTHS) -> tuple[int, dict]:
    """Time the scores kernel for every block size at every (query rows ``rows`` x cache ``lengths``)
    on this machine (interleaved medians, batch 1); returns (best block, {block: {"M,N": ms}}). The
    best minimises the mean over (M, N) of its time relative to the fastest block there, so short
    and long caches count alike."""
    from ..targets import resolve_target
    from .timing import interleaved, median_ms

    target = resolve_target(target or "cpu")
    rng = np.random.default_rng(0)
    cases = [(m, n) for m in sorted(set(rows)) for n in lengths]
    data = {(m, n): [tvm.runtime.tensor(rng.standard_normal(s).astype(dtype))
                     for s in ((1, heads, m, d), (1, heads, n, d))] + [tvm.runtime.empty((1, heads, m, n), dtype)]
            for m, n in cases}
    fns = {}
    for b in blocks:
        fn = tvm.compile(tvm.IRModule({"main": scores_kernel(heads, d, dtype, b)}), target)["main"]
        for c in cases:
            fns[f"{b} {c[0]},{c[1]}"] = [lambda fn=fn, a=data[c]: fn(*a)]
    t = {k: median_ms(v) for k, v in interleaved(fns, rounds=rounds).items()}
    ms = {b: {f"{m},{n}": t[f"{b} {m},{n}"] for m, n in cases} for b in blocks}
    score = {b: np.mean([ms[b][c] / min(ms[x][c] for x in blocks) for c in ms[b]]) for b in blocks}
    return min(score, key=score.get), ms
