"""ONNX files with external data: a tiny model whose every tensor lives in a side file, and a graph
beyond protobuf's 2 GB limit (nine 8192 x 8192 float32 weights, 2.4 GB), imported, compiled and run."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import shiftadd

from .conftest import ragged_batch


def test_external_data_model_compiles_like_the_inline_one(tiny_onnx, tmp_path):
    path = tiny_onnx("opt")
    model = onnx.load(path)
    (tmp_path / "ext").mkdir()
    ext = tmp_path / "ext" / "opt.onnx"
    onnx.save_model(model, ext, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin")
    assert ext.stat().st_size < 100_000 and (tmp_path / "ext" / "w.bin").stat().st_size > 100_000
    ids, mask = ragged_batch(4, 2, 9)
    feed = {"input_ids": ids, "attention_mask": mask}
    got = shiftadd.load(shiftadd.compile(str(ext), tmp_path / "e.so", "q3").so).run(None, feed)[0]
    inline = shiftadd.load(shiftadd.compile(path, tmp_path / "i.so", "q3").so).run(None, feed)[0]
    np.testing.assert_array_equal(got, inline)


def test_graph_beyond_2gb_imports_compiles_and_runs(tmp_path):
    """Read with its external data and checked by path (an in-memory check refuses a model beyond
    2 GB); float compile, against float64 numpy."""
    n, layers = 8192, 9
    rng = np.random.default_rng(0)
    weights, nodes, x = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((n, n), dtype=np.float32)
        w *= np.float32(1 / np.sqrt(n))
        weights.append(numpy_helper.from_array(w, f"layer{i}.weight"))
        nodes.append(helper.make_node("MatMul", [x, f"layer{i}.weight"], [f"h{i}"], name=f"/layer{i}/MatMul"))
        x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "beyond_2gb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", n])],
        weights,
    )
    path = tmp_path / "big.onnx"
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="big.onnx.data",
    )
    del graph, weights
    assert (tmp_path / "big.onnx.data").stat().st_size > 2**31
    sess = shiftadd.load(shiftadd.compile(str(path), tmp_path / "big.so", "none").so)
    feed = {"x": rng.standard_normal((2, n)).astype(np.float32)}
    got = sess.run(None, feed)[0]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
