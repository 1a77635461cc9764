"""Spelled-out RMSNorms become one ``R.nn.rms_norm`` (and equal the source); look-alikes are kept."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import _tiny
from .test_share_kv_heads import _run, assert_prefill_equals_onnxruntime


def _ops(func) -> list[str]:
    from tvm import relax

    return [
        b.value.op.name
        for blk in func.body.blocks
        for b in blk.bindings
        if isinstance(b.value, relax.Call) and hasattr(b.value.op, "name")
    ]


def test_llama_norms_fused_and_outputs_equal_onnxruntime(tmp_path):
    from shiftadd.frontend import export_onnx_with_cache, import_onnx
    from shiftadd.relax_passes.drop_identity_casts import drop_identity_casts
    from shiftadd.relax_passes.fuse_rms_norm import fuse_rms_norm

    model = _tiny("llama")
    ex = export_onnx_with_cache(model, tmp_path)
    imp = import_onnx(ex.prefill)
    mod, _ = drop_identity_casts(imp.mod)
    new, n = fuse_rms_norm(mod)
    assert n == 2 * model.config.num_hidden_layers + 1  # two per layer and the final norm
    ops = _ops(new["main"])
    assert ops.count("relax.nn.rms_norm") == n
    assert "relax.power" not in ops and "relax.mean" not in ops and "relax.sqrt" not in ops
    assert_prefill_equals_onnxruntime(new, imp.params, ex.prefill)


def _norm_module(d: int, variant: str, eps: float = 1e-5, mean_axis: int = -1, power: float = 2.0):
    """``main(x [n, d], w [d])``: an RMSNorm spelled out as exporters do, in ``variant``."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([3, d], "float32"))
    w = relax.Var("w", relax.TensorType([d], "float32"))
    f32 = lambda v: relax.const(v, "float32")  # noqa: E731
    with bb.function("main", [x, w], {"num_input": 2}):
        with bb.dataflow():
            sq = bb.emit(relax.op.multiply(x, x) if variant == "mul" else relax.op.power(x, f32(power)))
            m = bb.emit(relax.op.mean(sq, axis=[mean_axis], keepdims=True))
            v = bb.emit(relax.op.add(m, f32(eps)) if variant != "eps_first" else relax.op.add(f32(eps), m))
            if variant == "rsqrt":
                inv = bb.emit(relax.op.rsqrt(v))
            else:
                inv = bb.emit(relax.op.divide(f32(1.0), bb.emit(relax.op.sqrt(v))))
            y = bb.emit(relax.op.multiply(x, inv))
            out = bb.emit_output(relax.op.multiply(y, w) if variant == "w_last" else relax.op.multiply(w, y))
        bb.emit_func_output(out)
    return bb.get()


def _reference(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)))


@pytest.mark.parametrize("variant", ["div", "rsqrt", "mul", "w_last", "eps_first"])
def test_spellings_fused_and_equal_numpy(variant):
    from shiftadd.relax_passes.fuse_rms_norm import fuse_rms_norm

    mod = _norm_module(37, variant)
    new, n = fuse_rms_norm(mod)
    assert n == 1 and _ops(new["main"]) == ["relax.nn.rms_norm"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 37)).astype(np.float32)
    w = rng.standard_normal(37).astype(np.float32)
    (got,) = _run(new, {}, "main", {"x": x, "w": w})
    np.testing.assert_allclose(got, _reference(x, w, 1e-5), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "why, kwargs",
    [("mean over the first axis", dict(mean_axis=0)), ("a cube, not a square", dict(power=3.0))],
)
def test_look_alikes_are_kept(why, kwargs):
    from shiftadd.relax_passes.fuse_rms_norm import fuse_rms_norm

    mod = _norm_module(8, "div", **kwargs)
    new, n = fuse_rms_norm(mod)
    assert n == 0, why
    assert "relax.nn.rms_norm" not in _ops(new["main"])


@settings(max_examples=6, deadline=None)
@given(d=st.integers(1, 200), eps=st.sampled_from([1e-6, 1e-5, 0.25]), seed=st.integers(0, 2**16))
def test_fused_norm_equals_numpy_over_odd_widths(d, eps, seed):
    from shiftadd.relax_passes.fuse_rms_norm import fuse_rms_norm

    new, n = fuse_rms_norm(_norm_module(d, "div", eps=eps))
    assert n == 1
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, d)) * rng.uniform(0.01, 100)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    (got,) = _run(new, {}, "main", {"x": x, "w": w})
    np.testing.assert_allclose(got, _reference(x, w, eps), rtol=3e-5, atol=1e-5 * float(np.abs(w).max()))
