"""The exported RMSNorm's elementwise chain becomes one ``R.nn.rms_norm``.

Why: ONNX has no RMSNorm before opset 23, so Llama-family exports spell it out:
``w * (x / sqrt(mean(x^2, -1) + eps))`` (power, mean, add, sqrt, divide, multiply, multiply; or
``rsqrt``, ``x * x``). TVM's fusion splits that into three kernels per norm (the square alone, the
mean with the scaling, the weight multiply), each with its own buffer and VM instructions: 183
kernel calls per decode step of SmolLM2 for 61 norms. ``R.nn.rms_norm`` legalizes to one kernel.

Matched by what the graph computes, not by names: the square and the scaled ``x`` must be the same
tensor, the mean over the last axis with keepdims, the constants 2 and 1 exact, ``eps`` a scalar
constant, the weight one vector over the last axis. Anything else is left as it is.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard


def _scalar(const, want: float | None = None) -> float | None:
    """The value of a scalar (or one-element) constant, if it equals ``want`` when given."""
    if not isinstance(const, tvm.ir.GenericConst):
        return None
    v = const.value.numpy()
    if v.size != 1:
        return None
    v = float(v.reshape(-1)[0])
    return v if want is None or v == want else None


def _pattern():
    x, w, two, one, eps = wildcard(), wildcard(), is_const(), is_const(), is_const()
    square = is_op("relax.power")(x, two) | is_op("relax.multiply")(x, x)
    mean = is_op("relax.mean")(square)
    var = is_op("relax.add")(mean, eps) | is_op("relax.add")(eps, mean)
    inv = is_op("relax.rsqrt")(var) | is_op("relax.divide")(one, is_op("relax.sqrt")(var))
    scaled = is_op("relax.multiply")(x, inv) | is_op("relax.multiply")(inv, x)
    out = is_op("relax.multiply")(w, scaled) | is_op("relax.multiply")(scaled, w)
    named = {"x": x, "w": w, "two": two, "one": one, "eps": eps, "mean": mean, "square": square, "inv": inv}
    return out, named


def _last_axis_mean(call, rank: int) -> bool:
    axes = [int(a) % rank for a in (call.attrs.axis or [])]
    return axes == [rank - 1] and bool(call.attrs.keepdims)


def _rewrite(matches_done: list):
    def callback(expr, m):
        pat = _NAMED
        x, w, eps = m[pat["x"]], m[pat["w"]], m[pat["eps"]]
        xt, wt = x.ty, w.ty
        if not isinstance(xt, relax.TensorType) or not isinstance(wt, relax.TensorType):
            return expr
        if xt.ndim < 1 or wt.ndim != 1 or str(xt.dtype) != str(wt.dtype) or not str(xt.dtype).startswith("float"):
            return expr
        if not tvm_ffi.structural_equal(xt.shape.values[-1], wt.shape.values[0]):
            return expr
        if not _last_axis_mean(m[pat["mean"]], xt.ndim):
            return expr
        sq = m[pat["square"]]
        if "power" in sq.op.name and _scalar(m[pat["two"]], 2.0) is None:
            return expr
        inv = m[pat["inv"]]
        if "divide" in inv.op.name and _scalar(m[pat["one"]], 1.0) is None:
            return expr
        e = _scalar(eps)
        if e is None or not np.isfinite(e) or e < 0:
            return expr
        matches_done.append(1)
        return relax.op.nn.rms_norm(x, w, axes=[-1], epsilon=e)

    return callback


_PATTERN, _NAMED = _pattern()


def fuse_rms_norm(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """(``mod`` with every spelled-out RMSNorm as ``R.nn.rms_norm``, how many were replaced)."""
    done: list = []
    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gv] = rewrite_call(_PATTERN, _rewrite(done), func)
    return out, len(done)
