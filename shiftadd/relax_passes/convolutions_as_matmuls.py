"""2-D convolutions and transposed convolutions as matmuls (im2col / col2im), in NCHW.

Why: legalized, ``conv2d_transpose`` is a dilate, a pad and a direct convolution that no schedule
of ours (or dlight's CPU rules) takes, so it runs as one serial loop nest: on a ViT's upsampling
decoder (three 4x4 stride-2 transposed convolutions) seconds per image where ONNX Runtime takes
milliseconds; ``conv2d`` (a ViT's patch embedding) fares little better. As a gather of the input's
patches and a matmul, each is one operator our matmul schedule tiles and runs in parallel:

* ``conv2d(x, w)``: ``cols[n, (c, i, j), (oy, ox)] = x[n, c, oy*s + i*d - p, ox*s + j*d - p]`` (zero
  outside), then ``w.reshape(O, C*kh*kw) @ cols`` is the output, already in NCHW.
* ``conv2d_transpose(x, w)``: ``taps = x^T @ w.reshape(C, O*kh*kw)`` (each input pixel's contribution
  to every output it touches), then each output sums its ``ceil(k/s)^2`` taps (col2im).

Only groups of one, the NCHW/OIHW (IOHW) layouts, static channels and kernel sizes, and float
dtypes are rewritten; anything else stays as TVM legalizes it.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx

from .ir import mutate_functions, shape_of


def _ints(xs) -> list[int] | None:
    return [int(x) for x in xs] if all(isinstance(x, tirx.IntImm) for x in xs) else None


def _float_conv(call) -> str | None:
    """The dtype of a float convolution computed in its own dtype, else None."""
    x, w = call.args
    dtype = str(x.ty.dtype)
    out = "" if call.attrs.out_dtype is None else str(call.attrs.out_dtype)
    ok = dtype in ("float32", "float16") and str(w.ty.dtype) == dtype and out in ("", "void", dtype)
    return dtype if ok else None


def _padding(p) -> tuple[int, int, int, int]:
    p = [int(v) for v in p]
    return (p[0], p[1], p[0], p[1]) if len(p) == 2 else tuple(p)  # top, left, bottom, right


def _im2col(x, kh, kw, strides, dilation, pad, oh, ow):
    n, c, h, w = x.shape
    (sh, sw), (dh, dw), (pt, pl) = strides, dilation, pad[:2]

    def value(b, k, pos):
        ch, i, j = k // (kh * kw), k // kw % kh, k % kw
        y, xx = pos // ow * sh + i * dh - pt, pos % ow * sw + j * dw - pl
        inside = tirx.all(y >= 0, y < h, xx >= 0, xx < w)
        yc, xc = tirx.max(tirx.min(y, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)
        return tirx.if_then_else(inside, x[b, ch, yc, xc], tirx.const(0, x.dtype))

    return te.compute((n, c * kh * kw, oh * ow), value, name="im2col")


def _col2im(taps, cout, kh, kw, strides, pad, in_h, in_w, oh, ow):
    """``y[n, o, oy, ox] = sum of taps[n, h*W + w, o*kh*kw + i*kw + j]`` over ``oy = h*s + i - p``."""
    n = taps.shape[0]
    (sh, sw), (pt, pl) = strides, pad[:2]
    ra, rb = te.reduce_axis((0, -(-kh // sh)), "ra"), te.reduce_axis((0, -(-kw // sw)), "rb")

    def value(b, o, y, x):
        i, j = (y + pt) % sh + ra * sh, (x + pl) % sw + rb * sw
        h, w = (y + pt) // sh - ra, (x + pl) // sw - rb
        inside = tirx.all(i < kh, j < kw, h >= 0, h < in_h, w >= 0, w < in_w)
        hc, wc = tirx.max(tirx.min(h, in_h - 1), 0), tirx.max(tirx.min(w, in_w - 1), 0)
        ic, jc = tirx.min(i, kh - 1), tirx.min(j, kw - 1)
        tap = taps[b, hc * in_w + wc, o * kh * kw + ic * kw + jc]
        return te.sum(tirx.if_then_else(inside, tap, tirx.const(0, taps.dtype)), axis=[ra, rb])

    return te.compute((n, cout, oh, ow), value, name="col2im")


def _operands(call, kernel_layout: str):
    """(x, w, x's shape, w's static shape) of a float NCHW convolution with one group and
    ``kernel_layout``, else None."""
    a = call.attrs
    layouts = (a.data_layout, a.kernel_layout, a.out_layout or "NCHW")
    if layouts != ("NCHW", kernel_layout, "NCHW") or int(a.groups) != 1 or _float_conv(call) is None:
        return None
    x, w = call.args
    xs, ws = shape_of(x), _ints(shape_of(w) or [])
    if xs is None or len(xs) != 4 or ws is None or len(ws) != 4:
        return None
    return x, w, xs, ws


def _conv2d(bb, call):
    found = _operands(call, "OIHW")
    if found is None:
        return None
    x, w, xs, (o, c, kh, kw) = found
    a = call.attrs
    strides, dilation, pad = [int(v) for v in a.strides], [int(v) for v in a.dilation], _padding(a.padding)
    oh = (xs[2] + pad[0] + pad[2] - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (xs[3] + pad[1] + pad[3] - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    cols = bb.emit(bb.call_te(_im2col, x, kh, kw, strides, dilation, pad, oh, ow, primfunc_name_hint="im2col"))
    y = bb.emit(relax.op.matmul(relax.op.reshape(w, [o, c * kh * kw]), cols))
    return relax.op.reshape(y, [xs[0], o, oh, ow])


def _conv2d_transpose(bb, call):
    found = _operands(call, "IOHW")
    if found is None or [int(v) for v in call.attrs.dilation] != [1, 1]:
        return None
    x, w, xs, (c, o, kh, kw) = found
    a = call.attrs
    strides, pad, extra = [int(v) for v in a.strides], _padding(a.padding), [int(v) for v in a.output_padding]
    oh = (xs[2] - 1) * strides[0] - pad[0] - pad[2] + kh + extra[0]
    ow = (xs[3] - 1) * strides[1] - pad[1] - pad[3] + kw + extra[1]
    rows = relax.op.permute_dims(relax.op.reshape(x, [xs[0], c, xs[2] * xs[3]]), [0, 2, 1])
    taps = bb.emit(relax.op.matmul(rows, relax.op.reshape(w, [c, o * kh * kw])))
    return bb.call_te(_col2im, taps, o, kh, kw, strides, pad, xs[2], xs[3], oh, ow, primfunc_name_hint="col2im")


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rewritten = 0
        self.patterns = {"relax.nn.conv2d": _conv2d, "relax.nn.conv2d_transpose": _conv2d_transpose}

    def visit_call_(self, call):
        call = super().visit_call_(call)
        pattern = self.patterns.get(call.op.name) if isinstance(call.op, tvm.ir.Op) else None
        new = pattern(self.builder_, call) if pattern else None
        if new is None:
            return call
        self.rewritten += 1
        return new


def convolutions_as_matmuls(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """Rewrite every eligible ``conv2d`` / ``conv2d_transpose`` in every Relax function of ``mod``;
    returns (module, the number rewritten)."""
    rw = _Rewriter(mod)
    out = mutate_functions(rw, mod)
    return out, rw.rewritten
