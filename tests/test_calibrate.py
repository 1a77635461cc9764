"""The calibration pass: Hessians of every weight matmul's input match a torch computation."""

import numpy as np
import pytest
import torch

import shiftadd
from shiftadd.calibrate import collect_hessians
from shiftadd.frontend import import_onnx
from shiftadd.targets import resolve_target

from .conftest import _tiny


def test_hessians_match_torch_hooks(tiny_onnx):
    model = _tiny("llama")  # same seed, so the same weights as the exported file
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, 96, (1, 9)).astype(np.int64),
                "attention_mask": np.ones((1, 9), np.int64)} for _ in range(3)]
    hs, tokens = collect_hessians(import_onnx(tiny_onnx("llama")), batches, resolve_target("cpu"), skip=())
    assert tokens == 27
    ref, seen = {}, {}
    hooks = [mod.register_forward_hook(lambda m, inp, out, n=name: seen.setdefault(n, []).append(inp[0].reshape(-1, inp[0].shape[-1])))
             for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    with torch.no_grad():
        for b in batches:
            model(input_ids=torch.from_numpy(b["input_ids"]))
    for h in hooks:
        h.remove()
    for name, xs in seen.items():
        x = torch.cat(xs).double().numpy()
        ref[name + ".weight"] = x.T @ x / x.shape[0]
    assert set(hs) == set(ref)
    for name in ref:
        np.testing.assert_allclose(hs[name], ref[name], rtol=1e-4, atol=1e-5 * np.abs(ref[name]).max())


def test_bad_calibration_inputs(tiny_onnx):
    imported = import_onnx(tiny_onnx("llama"))
    with pytest.raises(ValueError, match="no calibration inputs"):
        collect_hessians(imported, [], resolve_target("cpu"))
    with pytest.raises(TypeError, match="calibration input 'input_ids': expected int64"):
        collect_hessians(imported, [{"input_ids": np.zeros((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int64)}],
                         resolve_target("cpu"))


def test_calibration_needs_weight_matmuls(tmp_path):
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    p = tmp_path / "relu.onnx"
    save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                           opset_imports=[helper.make_opsetid("", 17)]), str(p))
    with pytest.raises(ValueError, match="no weight matmuls to calibrate"):
        collect_hessians(import_onnx(str(p)), [{"x": np.ones((1, 4), np.float32)}], resolve_target("cpu"))
