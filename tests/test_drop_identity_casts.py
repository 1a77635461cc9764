"""Same-dtype casts are dropped, other casts kept, and the compiled model still equals ONNX Runtime."""

from __future__ import annotations

from .conftest import _tiny
from .test_share_kv_heads import assert_prefill_equals_onnxruntime


def test_identity_casts_dropped_and_outputs_equal_onnxruntime(tmp_path):
    from shiftadd.frontend import export_onnx_with_cache, import_onnx
    from shiftadd.relax_passes.drop_identity_casts import drop_identity_casts

    ex = export_onnx_with_cache(_tiny("llama"), tmp_path)
    imp = import_onnx(ex.prefill)
    new, n = drop_identity_casts(imp.mod)
    src = imp.mod["main"].script()
    assert n > 0 and new["main"].script().count("R.astype") == src.count("R.astype") - n
    from tvm import relax

    left = [
        b.value
        for blk in new["main"].body.blocks
        for b in blk.bindings
        if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.astype"
    ]
    assert left and all(str(c.args[0].ty.dtype) != str(c.attrs.dtype) for c in left)  # what is left converts
    assert_prefill_equals_onnxruntime(new, imp.params, ex.prefill)


def test_casts_that_change_dtype_are_kept():
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    from shiftadd.relax_passes.drop_identity_casts import drop_identity_casts

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float16"):
            a = R.astype(x, "float32")
            b = R.astype(a, "float16")
            return b

    new, n = drop_identity_casts(Mod)
    assert n == 1
    assert new["main"].script().count("R.astype") == 1 and 'dtype="float16"' in new["main"].script()
    assert isinstance(new, tvm.IRModule) and isinstance(new["main"], relax.Function)
