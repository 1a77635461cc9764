"""Attention scores ``matmul(q, permute_dims(k, [0, 1, 3, 2]))`` without materialising ``k^T``.

Scalar factors on ``k^T`` (ONNX's scaled-dot-product decomposition scales both sides) move onto ``q``.

Why: the keys arrive in the cache layout ``[B, H, N, D]`` and the export transposes them for the
matmul. Nothing fuses that transpose into the matmul, and with N symbolic (the cache grows) the
generic schedule of the matmul then reads the copy at a stride of N floats per product. The
scores kernel of schedules/attention_cpu.py reads each key row in place. Applies to every
4-D query/key pair with static heads and head size, of equal dtype (GQA after share_kv_heads,
OPT, GPT-2 alike); other matmuls are left alone.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..schedules.attention_cpu import AttentionKernel
from .attention_kernel_table import float_matmul_dtype, rewrite_calls
from .ir import is_op, resolve_binding, shape_of
from .share_kv_heads import _scalar_const


def _scores(rw, call):
    t, scales = resolve_binding(rw, call.args[1]), []
    while is_op(t, "relax.multiply") and (_scalar_const(t.args[0]) or _scalar_const(t.args[1])):
        side = 0 if _scalar_const(t.args[0]) else 1  # SDPA exports scale k^T by sqrt(1/sqrt(D))
        scales.append(t.args[side])
        t = resolve_binding(rw, t.args[1 - side])
    if not is_op(t, "relax.permute_dims") or t.attrs.axes is None or [int(a) for a in t.attrs.axes] != [0, 1, 3, 2]:
        return None
    q, k = call.args[0], t.args[0]
    qs, ks = shape_of(q), shape_of(k)
    dtype = float_matmul_dtype(call, q, k)
    if dtype is None or qs is None or ks is None or len(qs) != 4 or len(ks) != 4:
        return None
    if not all(isinstance(x, tvm.tirx.IntImm) for x in (qs[1], ks[1], qs[3], ks[3])):
        return None
    an = tvm.sym.Analyzer()
    if not (an.can_prove_equal(qs[0], ks[0]) and int(qs[1]) == int(ks[1]) and int(qs[3]) == int(ks[3])):
        return None
    gv = rw.table.call(AttentionKernel("scores", int(qs[1]), int(qs[3]), dtype), qs[2])
    for c in scales:  # q @ (k^T * c) == (q * c) @ k^T: scale the M x D queries, not the N x D keys
        q = rw.builder_.emit(relax.op.multiply(q, c))
    return relax.call_tir(gv, [q, k], relax.TensorType([qs[0], qs[1], qs[2], ks[2]], dtype))


def scores_from_cache(mod: tvm.IRModule, knob_of=None) -> tuple[tvm.IRModule, int, dict]:
    """Rewrite every ``q @ k^T`` of every Relax function of ``mod``; returns (module, the number of
    matmuls rewritten, ``{AttentionKernel: static query rows of its calls}``). Transposes left
    without users are removed. ``knob_of(spec)`` gives a kernel's block size (e.g.
    TuningDB.attention_knob; None: the default)."""
    return rewrite_calls(mod, "relax.matmul", _scores, knob_of, dce=True)
