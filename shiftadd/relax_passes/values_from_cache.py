"""Attention values ``matmul(p, v)`` over the cache read ``v [B, H, N, D]`` in place.

Why: with the cache length N symbolic, the legalized batched matmul gets only the generic schedules
(MetaSchedule keys workloads by static shapes and cannot tune it). The values kernel of
schedules/attention_cpu.py accumulates whole value rows (D contiguous floats, vectorised) per query
row, with a tuned column split. Applies to every 4-D matmul ``[B, H, M, N] x [B, H, N, D]`` whose
reduction length N is symbolic, with static heads and head size (GQA after share_kv_heads, OPT,
GPT-2 alike); static ones are left to MetaSchedule.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..schedules.attention_cpu import AttentionKernel
from .attention_kernel_table import float_matmul_dtype, rewrite_calls
from .ir import shape_of


def _values(rw, call):
    p, v = call.args
    ps, vs = shape_of(p), shape_of(v)
    dtype = float_matmul_dtype(call, p, v)
    if dtype is None or ps is None or vs is None or len(ps) != 4 or len(vs) != 4:
        return None
    if isinstance(ps[3], tvm.tirx.IntImm) or not all(isinstance(x, tvm.tirx.IntImm) for x in (ps[1], vs[1], vs[3])):
        return None
    an = tvm.sym.Analyzer()
    if not (an.can_prove_equal(ps[0], vs[0]) and int(ps[1]) == int(vs[1]) and an.can_prove_equal(ps[3], vs[2])):
        return None
    gv = rw.table.call(AttentionKernel("values", int(ps[1]), int(vs[3]), dtype), ps[2])
    return relax.call_tir(gv, [p, v], relax.TensorType([ps[0], ps[1], ps[2], vs[3]], dtype))


def values_from_cache(mod: tvm.IRModule, knob_of=None) -> tuple[tvm.IRModule, int, dict]:
    """Rewrite every ``p @ v`` over a symbolic cache length in every Relax function of ``mod``;
    returns (module, the number rewritten, ``{AttentionKernel: static query rows of its calls}``).
    ``knob_of(spec)``: the kernel's column split (e.g. TuningDB.attention_knob; None: the default)."""
    return rewrite_calls(mod, "relax.matmul", _values, knob_of)
