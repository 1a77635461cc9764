"""Grouped-query attention without copying the keys and values per query head.

Why: Hugging Face's Llama (``repeat_kv``) exports GQA as ``expand_dims -> broadcast_to -> reshape``
of the cached keys/values to every query head before the two attention matmuls. Nothing fuses that
broadcast into the matmul, so every decode step writes the whole cache ``heads / kv_heads`` times
over (SmolLM2: 3x, for K and V of 30 layers) and then transposes and scales the copy. The same
products come out of a matmul per key/value head over its group of query heads: with
``H = KVH * G`` query heads, ``q [B, H, M, D]`` is ``[B, KVH, G*M, D]`` in memory, so

    matmul(q, bcast(k)^T * c)  ==  reshape(matmul(reshape(q, [B, KVH, G*M, D]), k^T * c), [B, H, M, N])

and likewise for ``probs @ bcast(v)``: same multiplications, same sums, no copies. Scalar scales and
the last-two-axes transpose between the broadcast and the matmul move onto the un-broadcast tensor.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .ir import is_op, mutate_functions, resolve_binding, shape_of


def _scalar_const(e) -> bool:
    return isinstance(e, tvm.ir.GenericConst) and len(e.value.shape) == 0


@relax.expr_functor.mutator
class _ShareKVHeads(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rewritten = 0

    def _resolve(self, e):
        return resolve_binding(self, e)

    def _grouped(self, rhs):
        """(kv [B, KVH, N, D], G, ops to replay on it) if ``rhs`` is a GQA broadcast of kv, optionally
        transposed on its last two axes and scaled by scalars; else None."""
        ops, e = [], self._resolve(rhs)
        while True:
            if (
                is_op(e, "relax.permute_dims")
                and e.attrs.axes is not None
                and [int(a) for a in e.attrs.axes] == [0, 1, 3, 2]
            ):
                ops.append(("t", None, 0))
                e = self._resolve(e.args[0])
            elif is_op(e, "relax.multiply") and (_scalar_const(e.args[0]) or _scalar_const(e.args[1])):
                side = 0 if _scalar_const(e.args[0]) else 1
                ops.append(("mul", e.args[side], side))
                e = self._resolve(e.args[1 - side])
            else:
                break
        if not is_op(e, "relax.reshape"):
            return None
        b = self._resolve(e.args[0])
        if not is_op(b, "relax.broadcast_to"):
            return None
        x = b.args[0]
        xe = self._resolve(x)
        if not is_op(xe, "relax.expand_dims") or [int(a) for a in xe.attrs.axis] != [2]:
            return None
        kv = xe.args[0]
        ks, bs, rs = shape_of(kv), shape_of(b), shape_of(e)
        if ks is None or bs is None or rs is None or len(ks) != 4 or len(bs) != 5 or len(rs) != 4:
            return None
        g = bs[2]
        if not isinstance(g, tvm.tirx.IntImm) or not isinstance(ks[1], tvm.tirx.IntImm):
            return None
        an = tvm.sym.Analyzer()
        same = [
            an.can_prove_equal(bs[0], ks[0]),
            an.can_prove_equal(bs[1], ks[1]),
            an.can_prove_equal(bs[3], ks[2]),
            an.can_prove_equal(bs[4], ks[3]),
            an.can_prove_equal(rs[0], ks[0]),
            an.can_prove_equal(rs[1], ks[1] * g),
            an.can_prove_equal(rs[2], ks[2]),
            an.can_prove_equal(rs[3], ks[3]),
        ]
        return (kv, int(g), ops[::-1]) if all(same) else None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not is_op(call, "relax.matmul"):
            return call
        m = self._grouped(call.args[1])
        q = call.args[0]
        qs = shape_of(q)
        if m is None or qs is None or len(qs) != 4:
            return call
        kv, g, ops = m
        kvh = int(shape_of(kv)[1])
        if not tvm.sym.Analyzer().can_prove_equal(qs[1], kvh * g):
            return call
        rhs = kv
        for kind, c, side in ops:
            rhs = self.builder_.emit(
                relax.op.permute_dims(rhs, [0, 1, 3, 2])
                if kind == "t"
                else relax.op.multiply(*((c, rhs) if side == 0 else (rhs, c)))
            )
        q5 = self.builder_.emit(relax.op.reshape(q, [qs[0], kvh, g * qs[2], qs[3]]))
        out = self.builder_.emit(relax.op.matmul(q5, rhs, out_dtype=call.attrs.out_dtype))
        self.rewritten += 1
        return relax.op.reshape(out, [qs[0], qs[1], qs[2], shape_of(out)[3]])


def share_kv_heads(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """Rewrite every GQA attention matmul of every Relax function of ``mod``; returns (module, the
    number of matmuls rewritten). Broadcasts left without users are removed."""
    rw = _ShareKVHeads(mod)
    return mutate_functions(rw, mod, dce=lambda: rw.rewritten), rw.rewritten
