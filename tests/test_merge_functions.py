"""Prefill and decode graphs of one model share one set of weights, matched by what they are: the
exporter names folded constants after its nodes, differently in each graph (issue 23: a Gemma-style
embedding scale stopped a compile with "weight 'Mul_6253' is not a weight of 'main'")."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .conftest import VOCAB, _tiny


def test_decode_weights_are_matched_by_value_and_kept_when_only_decode_has_them(tmp_path):
    import tvm
    from tvm import relax

    from shiftadd.frontend import export_onnx_with_cache, import_onnx, merge_functions
    from shiftadd.relax_passes.pipeline import build
    from shiftadd.schedules.targets import resolve_target

    ex = export_onnx_with_cache(_tiny("llama"), tmp_path)
    dec = onnx.load(ex.decode)
    inits = {i.name: i for i in dec.graph.initializer}
    norm = "m.model.layers.0.input_layernorm.weight"  # main's model.layers.0.input_layernorm.weight
    inits[norm].name = "Mul_6253"  # the same value under another name
    head = inits["onnx::MatMul_753"]  # lm_head (named so by the import): a value main does not have
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 2, "onnx::MatMul_753"))
    for n in dec.graph.node:
        n.input[:] = ["Mul_6253" if x == norm else x for x in n.input]
    onnx.save(dec, tmp_path / "decode2.onnx")

    base, other = import_onnx(ex.prefill), import_onnx(tmp_path / "decode2.onnx")
    mod = merge_functions(base, {"decode": other})
    params = base.params
    func = mod["decode"]
    n_in = int(func.attrs["num_input"])
    names = [v.name for v in func.params[n_in:]]
    assert "Mul_6253" not in names and "model.layers.0.input_layernorm.weight" in names  # shared by value
    assert "lm_head.weight.decode" in names and np.array_equal(
        params["lm_head.weight.decode"], 2 * params["lm_head.weight"]
    )  # kept as a parameter of its own

    rng = np.random.default_rng(0)
    layers = sum(1 for i in dec.graph.input if i.name.startswith("past"))
    feeds = {"input_ids": rng.integers(0, VOCAB, (1, 2)).astype(np.int64), "attention_mask": np.ones((1, 5), np.int64)}
    for i in dec.graph.input:
        if i.name not in feeds:
            dims = [d.dim_value or {"batch": 1}.get(d.dim_param, 3) for d in i.type.tensor_type.shape.dim]
            feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
    want = ort.InferenceSession(str(tmp_path / "decode2.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    vm = relax.VirtualMachine(build(mod, resolve_target("cpu")), tvm.cpu())
    args = [tvm.runtime.tensor(feeds[name]) for name in other.input_names]
    args += [tvm.runtime.tensor(params[n]) for n in names]
    got = vm["decode"](*args)[0].numpy()
    assert layers > 0 and np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_prefill_and_decode_tensors_never_share_a_folder(tmp_path):
    """Beyond 2 GB the exporter writes each tensor to a file named after it beside its graph, and the
    two graphs give different tensors one anonymous name: in one folder the decode export overwrote
    the prefill's weights (a 582M-parameter Llama compiled to wrong logits). Each graph has its own."""
    from shiftadd.frontend import export_onnx_with_cache

    ex = export_onnx_with_cache(_tiny("llama"), tmp_path)
    assert ex.prefill.parent != ex.decode.parent
    graphs = {
        g: {i.name: numpy_helper.to_array(i) for i in onnx.load(g).graph.initializer} for g in (ex.prefill, ex.decode)
    }
    for g in graphs:  # what the exporter does beyond 2 GB
        onnx.save_model(onnx.load(g), g, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    for g, before in graphs.items():
        after = {i.name: numpy_helper.to_array(i) for i in onnx.load(g).graph.initializer}
        assert after.keys() == before.keys() and all(np.array_equal(after[n], before[n]) for n in before)
