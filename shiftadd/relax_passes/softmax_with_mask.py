"""Attention softmax as one kernel, the mask's add fused in.

Why: legalized, ``softmax(scores + mask)`` is two operators (the add is not fused into the softmax's
reductions), each a parallel launch with generic schedules; with the cache length symbolic
MetaSchedule cannot tune them. The softmax kernel of schedules/attention_cpu.py adds the mask,
takes each row's maximum, exponentials and sum in one pass, with a tuned number of rows per task
(docs/ENGINEERING.md). Applies to ``softmax(x, axis=-1)`` over 4-D
``x [B, H, M, N]`` with static heads (N symbolic, or static as in a ViT's attention, whose legalized
softmax reduced each row in one serial chain); when ``x = a + mask`` with ``mask`` of shape
``[1 or B, 1 or H, 1 or M, N]`` the add is folded in, otherwise the kernel takes ``x`` alone.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..schedules.attention_cpu import AttentionKernel
from .attention_kernel_table import rewrite_calls
from .ir import is_op, resolve_binding, shape_of


def _mask_pattern(xs, ms) -> str | None:
    """The bias string of a mask of shape ``ms`` broadcast onto ``xs`` (both 4-D), or None."""
    if ms is None or len(ms) != 4:
        return None
    an, out = tvm.sym.Analyzer(), ""
    for x, m in zip(xs[:3], ms[:3]):
        if isinstance(m, tvm.tirx.IntImm) and int(m) == 1:
            out += "1"
        elif an.can_prove_equal(x, m):
            out += "x"
        else:
            return None
    return out if an.can_prove_equal(xs[3], ms[3]) else None


def _softmax(rw, call):
    if int(call.attrs.axis) not in (-1, 3):
        return None
    x = call.args[0]
    xs = shape_of(x)
    if xs is None or len(xs) != 4 or not isinstance(xs[1], tvm.tirx.IntImm):
        return None
    dtype = str(x.ty.dtype)
    if dtype not in ("float32", "float16"):
        return None
    args, bias = [x], ""
    add = resolve_binding(rw, x)
    if is_op(add, "relax.add"):
        an = tvm.sym.Analyzer()
        for a, m in (add.args, add.args[::-1]):
            sa, pattern = shape_of(a), _mask_pattern(xs, shape_of(m))
            if (
                sa is not None
                and len(sa) == 4
                and all(an.can_prove_equal(u, w) for u, w in zip(sa, xs))
                and pattern is not None
                and str(a.ty.dtype) == str(m.ty.dtype) == dtype
            ):
                args, bias = [a, m], pattern
                break
    gv = rw.table.call(AttentionKernel("softmax", int(xs[1]), 0, dtype, bias), xs[2])
    return relax.call_tir(gv, args, relax.TensorType(xs, dtype))


def softmax_with_mask(mod: tvm.IRModule, knob_of=None) -> tuple[tvm.IRModule, int, dict]:
    """Rewrite every 4-D softmax over the last axis in every Relax function of ``mod``; returns
    (module, the number rewritten, ``{AttentionKernel: static query rows of its calls}``). Adds left
    without users are removed. ``knob_of(spec)``: rows per task (TuningDB.attention_knob; None: default)."""
    return rewrite_calls(mod, "relax.nn.softmax", _softmax, knob_of, dce=True)
