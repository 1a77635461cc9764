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
from .attention_kernel_table import KernelTable
from .rewrite_lut_matmul import _is_op, _shape, mutate_functions


@relax.expr_functor.mutator
class _ValuesFromCache(relax.PyExprMutator):
    def __init__(self, mod, knob_of=None):
        super().__init__(mod)
        self.table = KernelTable(self.builder_, knob_of)
        self.rewritten = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not _is_op(call, "relax.matmul"):
            return call
        p, v = call.args
        ps, vs = _shape(p), _shape(v)
        if ps is None or vs is None or len(ps) != 4 or len(vs) != 4:
            return call
        dtype = str(p.ty.dtype)
        out_dtype = "" if call.attrs.out_dtype is None else str(call.attrs.out_dtype)
        if dtype != str(v.ty.dtype) or dtype not in ("float32", "float16") or out_dtype not in ("", "void", dtype):
            return call
        if isinstance(ps[3], tvm.tirx.IntImm) or not all(isinstance(x, tvm.tirx.IntImm) for x in (ps[1], vs[1], vs[3])):
            return call
        an = tvm.sym.Analyzer()
        if not (an.can_prove_equal(ps[0], vs[0]) and int(ps[1]) == int(vs[1]) and an.can_prove_equal(ps[3], vs[2])):
            return call
        gv = self.table.call(AttentionKernel("values", int(ps[1]), int(vs[3]), dtype), ps[2])
        self.rewritten += 1
        return relax.call_tir(gv, [p, v], relax.TensorType([ps[0], ps[1], ps[2], vs[3]], dtype))


def values_from_cache(mod: tvm.IRModule, knob_of=None) -> tuple[tvm.IRModule, int, dict]:
    """Rewrite every ``p @ v`` over a symbolic cache length in every Relax function of ``mod``;
    returns (module, the number rewritten, ``{AttentionKernel: static query rows of its calls}``).
    ``knob_of(spec)``: the kernel's column split (e.g. TuningDB.attention_knob; None: the default)."""
    rw = _ValuesFromCache(mod, knob_of)
    return mutate_functions(rw, mod), rw.rewritten, rw.table.specs()
