"""Convolutions as matmuls (relax_passes/convolutions_as_matmuls.py) and the matmul schedule's padded
ragged columns, against torch over odd shapes, strides, paddings and dilations."""

from __future__ import annotations

import numpy as np
import torch
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from shiftadd.relax_passes.convolutions_as_matmuls import convolutions_as_matmuls
from shiftadd.relax_passes.pipeline import build
from shiftadd.schedules.targets import resolve_target

TARGET = resolve_target("cpu")


def _run(make, x, w, expect_rewritten=1):
    """Build ``make(x_var, w_var)`` as a one-op Relax function (batch symbolic), rewrite it, run it."""
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    xv = relax.Var("x", relax.TensorType([n, *x.shape[1:]], "float32"))
    wv = relax.Var("w", relax.TensorType(list(w.shape), "float32"))
    with bb.function("main", [xv, wv]):
        with bb.dataflow():
            out = bb.emit_output(make(xv, wv))
        bb.emit_func_output(out)
    mod, count = convolutions_as_matmuls(bb.get())
    assert count == expect_rewritten
    vm = relax.VirtualMachine(build(mod, TARGET), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 5),
    o=st.integers(1, 6),
    hw=st.tuples(st.integers(4, 11), st.integers(4, 11)),
    k=st.tuples(st.integers(1, 4), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pad=st.tuples(st.integers(0, 2), st.integers(0, 1), st.integers(0, 2), st.integers(0, 1)),
    dilation=st.integers(1, 2),
)
def test_conv2d_as_matmul_equals_torch(n, c, o, hw, k, stride, pad, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, *hw)).astype(np.float32)
    w = rng.standard_normal((o, c, *k)).astype(np.float32)
    top, left, bottom, right = pad
    if any(h + a + b < dilation * (kk - 1) + 1 for h, a, b, kk in zip(hw, (top, left), (bottom, right), k)):
        return  # no output position
    got = _run(lambda xv, wv: relax.op.nn.conv2d(xv, wv, stride, pad, dilation), x, w)
    padded = torch.nn.functional.pad(torch.from_numpy(x), (left, right, top, bottom))
    want = torch.nn.functional.conv2d(padded, torch.from_numpy(w), stride=stride, dilation=dilation).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 5),
    o=st.integers(1, 6),
    hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    k=st.tuples(st.integers(1, 5), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    data=st.data(),
)
def test_conv2d_transpose_as_matmul_equals_torch(n, c, o, hw, k, stride, data):
    pad = tuple(data.draw(st.integers(0, kk - 1)) for kk in k)
    extra = tuple(data.draw(st.integers(0, s - 1)) for s in stride)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, c, *hw)).astype(np.float32)
    w = rng.standard_normal((c, o, *k)).astype(np.float32)
    if any((h - 1) * s - 2 * p + kk + e <= 0 for h, s, p, kk, e in zip(hw, stride, pad, k, extra)):
        return
    got = _run(lambda xv, wv: relax.op.nn.conv2d_transpose(xv, wv, stride, pad, extra), x, w)
    want = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=pad, output_padding=extra
    ).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_grouped_convolution_is_left_to_tvm():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((1, 4, 6, 6)).astype(np.float32), rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    got = _run(lambda xv, wv: relax.op.nn.conv2d(xv, wv, groups=2), x, w, expect_rewritten=0)
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), groups=2).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(32, 300), batch=st.integers(1, 3))
def test_matmul_schedule_with_ragged_columns_equals_numpy(m, k, n, batch):
    """Columns not a multiple of the register tile (257 tokens) are padded, not left a masked tail."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((batch, m, k)).astype(np.float32)
    b = rng.standard_normal((batch, k, n)).astype(np.float32)
    bb = relax.BlockBuilder()
    av, bv = relax.Var("a", relax.TensorType(a.shape, "float32")), relax.Var("b", relax.TensorType(b.shape, "float32"))
    with bb.function("main", [av, bv]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(av, bv))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(build(bb.get(), TARGET), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-4)
