"""Exponentials the CPU can vectorise: ``exp`` and ``sigmoid`` of float32 as inline polynomials.

Why: TVM lowers ``exp`` to LLVM's ``llvm.exp`` intrinsic, which x86 code generation without a vector
math library scalarises into one ``expf`` libm call per lane, so a vectorised SiLU or softmax ran at
libm speed (docs/ENGINEERING.md). The replacement is Cephes' ``expf`` (range reduction by ln 2 in
two parts, a degree-6 polynomial, the power of two built in the exponent bits): within 1 ulp of
the exact value (tests/test_default_schedules.py), inf above float32's range, NaN kept. Applied to
every PrimFunc of the lowered module (ours and TVM's), so a kernel needs no math of its own.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir import Call, Op

LO, HI = -104.0, 88.72283  # exp(x) rounds to 0 in float32 below LO and overflows above HI
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _f(v: float):
    return tirx.const(v, "float32")


def _pow2(k):
    """2.0^k for an int32 ``k`` in [-126, 127]."""
    return tirx.reinterpret("float32", tirx.shift_left(k + tirx.const(127, "int32"), tirx.const(23, "int32")))


def fast_exp(x):
    """``exp(x)`` of a float32 expression as vectorisable arithmetic (``x`` is bound once)."""
    v = tirx.Var("exp_x", "float32")
    c = tirx.min(tirx.max(v, _f(LO)), _f(HI))
    n = tirx.floor(c * _f(1.4426950408889634) + _f(0.5))
    r = c - n * _f(0.693359375) - n * _f(-2.12194440e-4)  # ln 2 split: n * 0.693359375 is exact
    p = _f(_POLY[0])
    for coef in _POLY[1:]:
        p = p * r + _f(coef)
    p = p * r * r + r + _f(1.0)
    # 2^n as two powers of two built in the exponent bits, each normal for n in [-150, 128]: the
    # product then rounds to float32's denormals and its largest values as expf does
    ni = tirx.Cast("int32", n)
    half = tirx.shift_right(ni, tirx.const(1, "int32"))
    y = p * _pow2(half) * _pow2(ni - half)
    y = tirx.Select(v > _f(HI), _f(float("inf")), y)
    y = tirx.Select(tirx.isnan(v), v, y)  # NaN in, NaN out
    return tirx.Let(v, x, y)


_EXP, _SIGMOID = Op.get("tirx.exp"), Op.get("tirx.sigmoid")


def _rewrite(node):
    if not isinstance(node, Call) or str(getattr(node.ty, "dtype", "")) != "float32":
        return node
    if node.op.same_as(_EXP):
        return fast_exp(node.args[0])
    if node.op.same_as(_SIGMOID):  # 1 / (1 + e^-x): e^-x = inf gives 0, as it should
        return _f(1.0) / (_f(1.0) + fast_exp(-node.args[0]))
    return node


def vectorisable_math(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with every float32 ``exp`` / ``sigmoid`` call replaced by :func:`fast_exp` arithmetic."""
    body = tvm_ffi.structural_map(func.body, [(Call, _rewrite)], order="post")
    return func if body.same_as(func.body) else func.with_body(body)


def vectorisable_math_module(mod: tvm.IRModule) -> tvm.IRModule:
    """:func:`vectorisable_math` on every PrimFunc of ``mod``."""
    out = {}
    for gv, func in mod.functions_items():
        out[gv] = vectorisable_math(func) if isinstance(func, tirx.PrimFunc) else func
    return tvm.IRModule(out, attrs=mod.attrs, global_infos=mod.global_infos)
