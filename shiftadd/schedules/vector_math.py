"""Exponentials the CPU can vectorise: ``exp``, ``sigmoid`` and ``erf`` of float32 as inline polynomials.

Why: TVM lowers ``exp`` to LLVM's ``llvm.exp`` intrinsic, which x86 code generation without a vector
math library scalarises into one ``expf`` libm call per lane, so a vectorised SiLU or softmax ran at
libm speed (docs/ENGINEERING.md); ``erf`` (GELU) likewise. The replacement for ``exp`` is Cephes'
``expf`` (range reduction by ln 2 in two parts, a degree-6 polynomial, the power of two built in the
exponent bits): within 1 ulp of the exact value (tests/test_default_schedules.py), inf above
float32's range, NaN kept. Applied to every PrimFunc of the lowered module (ours and TVM's), so a
kernel needs no math of its own.
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


def _horner(x, coefs):
    """``coefs[0] x^n + ... + coefs[n]`` as n multiply-adds."""
    p = _f(coefs[0])
    for c in coefs[1:]:
        p = p * x + _f(c)
    return p


def _pow2(k):
    """2.0^k for an int32 ``k`` in [-126, 127]."""
    return tirx.reinterpret("float32", tirx.shift_left(k + tirx.const(127, "int32"), tirx.const(23, "int32")))


def fast_exp(x):
    """``exp(x)`` of a float32 expression as vectorisable arithmetic (``x`` is bound once)."""
    v = tirx.Var("exp_x", "float32")
    c = tirx.min(tirx.max(v, _f(LO)), _f(HI))
    n = tirx.floor(c * _f(1.4426950408889634) + _f(0.5))
    r = c - n * _f(0.693359375) - n * _f(-2.12194440e-4)  # ln 2 split: n * 0.693359375 is exact
    p = _horner(r, _POLY) * r * r + r + _f(1.0)
    # 2^n as two powers of two built in the exponent bits, each normal for n in [-150, 128]: the
    # product then rounds to float32's denormals and its largest values as expf does
    ni = tirx.Cast("int32", n)
    half = tirx.shift_right(ni, tirx.const(1, "int32"))
    y = p * _pow2(half) * _pow2(ni - half)
    y = tirx.Select(v > _f(HI), _f(float("inf")), y)
    y = tirx.Select(tirx.isnan(v), v, y)  # NaN in, NaN out
    return tirx.Let(v, x, y)


# erf: Eigen's rational approximation on [-4, 4] (odd numerator, even denominator in x^2); erf is
# +-1 in float32 beyond
_ERF_P = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)  # alpha_13 .. alpha_1
_ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)  # beta_8 .. beta_0


def fast_erf(x):
    """``erf(x)`` of a float32 expression as vectorisable arithmetic (GELU's, in ViTs and BERTs)."""
    v = tirx.Var("erf_x", "float32")
    c = tirx.min(tirx.max(v, _f(-4.0)), _f(4.0))
    c2 = c * c
    y = tirx.Select(tirx.isnan(v), v, c * _horner(c2, _ERF_P) / _horner(c2, _ERF_Q))
    return tirx.Let(v, x, y)


_EXP, _SIGMOID, _ERF = Op.get("tirx.exp"), Op.get("tirx.sigmoid"), Op.get("tirx.erf")


def _rewrite(node):
    if not isinstance(node, Call) or str(getattr(node.ty, "dtype", "")) != "float32":
        return node
    if node.op.same_as(_EXP):
        return fast_exp(node.args[0])
    if node.op.same_as(_SIGMOID):  # 1 / (1 + e^-x): e^-x = inf gives 0, as it should
        return _f(1.0) / (_f(1.0) + fast_exp(-node.args[0]))
    if node.op.same_as(_ERF):
        return fast_erf(node.args[0])
    return node


def vectorisable_math(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with every float32 ``exp`` / ``sigmoid`` / ``erf`` call replaced by arithmetic."""
    body = tvm_ffi.structural_map(func.body, [(Call, _rewrite)], order="post")
    return func if body.same_as(func.body) else func.with_body(body)


def vectorisable_math_module(mod: tvm.IRModule) -> tvm.IRModule:
    """:func:`vectorisable_math` on every PrimFunc of ``mod``."""
    out = {}
    for gv, func in mod.functions_items():
        out[gv] = vectorisable_math(func) if isinstance(func, tirx.PrimFunc) else func
    return tvm.IRModule(out, attrs=mod.attrs, global_infos=mod.global_infos)
