"""The calibration pass: Hessians of every weight matmul's input match a torch computation."""

import numpy as np
import pytest
import torch

import shiftadd
from shiftadd.calibration.hessians import collect_hessians
from shiftadd.frontend import import_onnx
from shiftadd.schedules.targets import resolve_target

from .conftest import VOCAB, _tiny, tiny_llama_folder


def random_batches(seed, count, shape):
    """``count`` calibration inputs: random token ids of ``shape`` [batch, seq], attention masks all ones."""
    rng = np.random.default_rng(seed)
    return [
        {"input_ids": rng.integers(0, VOCAB, shape).astype(np.int64), "attention_mask": np.ones(shape, np.int64)}
        for _ in range(count)
    ]


def test_hessians_match_torch_hooks(tiny_onnx):
    model = _tiny("llama")  # same seed, so the same weights as the exported file
    batches = random_batches(0, 3, (1, 9))
    hs, tokens = collect_hessians(import_onnx(tiny_onnx("llama")), batches, resolve_target("cpu"), skip=())
    assert tokens == 27
    ref, seen = {}, {}
    hooks = [
        mod.register_forward_hook(
            lambda m, inp, out, n=name: seen.setdefault(n, []).append(inp[0].reshape(-1, inp[0].shape[-1]))
        )
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    ]
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


def test_one_pass_hessians_are_reused_only_for_the_same_content(tiny_onnx):
    """Compiling variants of one model in a process calibrates once; other inputs or weights measure anew."""
    from shiftadd.calibration.hessians import calibrate

    imported = import_onnx(tiny_onnx("llama"))
    batches = random_batches(1, 2, (1, 7))
    tgt = resolve_target("cpu")
    first = calibrate(imported, batches, tgt, mode="one-pass")
    assert calibrate(imported, batches, tgt, mode="one-pass") is first
    other = [{**b, "input_ids": (b["input_ids"] + 1) % 96} for b in batches]
    again = calibrate(imported, other, tgt, mode="one-pass")
    assert again is not first
    name = next(iter(again.hessians))
    assert not np.allclose(again.hessians[name], first.hessians[name])
    imported.params[next(iter(imported.params))] = imported.params[next(iter(imported.params))] * 2
    assert calibrate(imported, other, tgt, mode="one-pass") is not again


def test_bad_calibration_inputs(tiny_onnx):
    imported = import_onnx(tiny_onnx("llama"))
    with pytest.raises(ValueError, match="no calibration inputs"):
        collect_hessians(imported, [], resolve_target("cpu"))
    with pytest.raises(TypeError, match="calibration input 'input_ids': expected int64"):
        collect_hessians(
            imported,
            [{"input_ids": np.zeros((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int64)}],
            resolve_target("cpu"),
        )


def test_calibration_needs_weight_matmuls(tmp_path):
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    p = tmp_path / "relu.onnx"
    save(
        helper.make_model(
            helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
            opset_imports=[helper.make_opsetid("", 17)],
        ),
        str(p),
    )
    with pytest.raises(ValueError, match="no weight matmuls to calibrate"):
        collect_hessians(import_onnx(str(p)), [{"x": np.ones((1, 4), np.float32)}], resolve_target("cpu"))


def test_calibrated_rewrite_is_exact_against_onnxruntime(tiny_onnx):
    """The error-feedback fit changes only the codes: the compiled model still equals ONNX Runtime on
    the dequantized weights."""
    import onnx
    import onnxruntime as ort
    import tvm
    from onnx import numpy_helper
    from tvm import relax

    from shiftadd.frontend.onnx_import import name_weights
    from shiftadd.quant import BCQConfig
    from shiftadd.relax_passes import rewrite_lut_matmul
    from shiftadd.relax_passes.pipeline import build

    path = tiny_onnx("opt")
    imported = import_onnx(path)
    batches = random_batches(1, 2, (2, 8))
    hs, _ = collect_hessians(imported, batches, resolve_target("cpu"))
    mod, params, rep = rewrite_lut_matmul(
        imported.mod, imported.params, BCQConfig(bits=3, group=32), keep_dequantized=True, hessians=hs
    )
    assert rep.rewritten and all(r.calibrated for r in rep.rewritten)
    vm = relax.VirtualMachine(build(mod, resolve_target("cpu")), tvm.cpu())
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    ours = vm["main"](
        tvm.runtime.tensor(ids), tvm.runtime.tensor(mask), *[tvm.runtime.tensor(v) for v in params.values()]
    ).numpy()
    model = onnx.load(path)
    name_weights(model)
    for init in model.graph.initializer:
        if init.name in rep.dequantized:
            init.CopyFrom(numpy_helper.from_array(rep.dequantized[init.name].astype(np.float32), init.name))
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids, "attention_mask": mask}
    )[0]
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()


def test_sequential_hessians_see_the_quantized_earlier_blocks(tiny_onnx):
    """Block 1's Hessians are measured with block 0 already replaced by its fitted weights (checked
    against torch hooks on a model carrying those weights); block 0's are the float model's."""
    from shiftadd.calibration.hessians import calibrate
    from shiftadd.quant import BCQConfig
    from shiftadd.quant.gptq import quantize_matrix_gptq

    model = _tiny("llama")
    batches = random_batches(2, 2, (1, 10))
    cfg = BCQConfig(bits=2, group=36)
    cal = calibrate(
        import_onnx(tiny_onnx("llama")),
        batches,
        resolve_target("cpu"),
        mode="sequential",
        fit=lambda name, w, h: quantize_matrix_gptq(w, h, cfg),
    )
    assert cal.forwards == 2 * 2 and set(cal.fitted) == set(cal.hessians)

    def hooked():
        seen = {}
        hooks = [
            m.register_forward_hook(
                lambda m, i, o, n=name: seen.setdefault(n + ".weight", []).append(i[0].reshape(-1, i[0].shape[-1]))
            )
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name
        ]
        with torch.no_grad():
            for b in batches:
                model(input_ids=torch.from_numpy(b["input_ids"]))
        for h in hooks:
            h.remove()
        return {n: (lambda x: x.T @ x / x.shape[0])(torch.cat(v).double().numpy()) for n, v in seen.items()}

    float_h = hooked()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.0."):
                m.weight.copy_(torch.from_numpy(cal.fitted[name + ".weight"].dequantize()))
    quant_h = hooked()
    for name, h in cal.hessians.items():
        ref = float_h[name] if name.startswith("model.layers.0.") else quant_h[name]
        np.testing.assert_allclose(h, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=name)
        if name.startswith("model.layers.1."):
            assert np.abs(float_h[name] - quant_h[name]).max() > 1e-3 * np.abs(ref).max()  # the check has teeth


def test_calibration_input_checks(tiny_onnx):
    from shiftadd.calibration.hessians import calibrate

    imported = import_onnx(tiny_onnx("llama"))
    tgt = resolve_target("cpu")
    ok = {"input_ids": np.zeros((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64)}
    with pytest.raises(ValueError, match="expected rank 2"):
        calibrate(imported, [{**ok, "input_ids": np.zeros(4, np.int64)}], tgt, mode="one-pass")
    with pytest.raises(ValueError, match="missing input 'attention_mask'"):
        calibrate(imported, [{"input_ids": ok["input_ids"]}], tgt, mode="one-pass")
    with pytest.raises(ValueError, match="mode must be one of"):
        calibrate(imported, [ok], tgt, mode="fast")
    with pytest.raises(ValueError, match="sequential calibration needs a fit"):
        calibrate(imported, [ok], tgt, mode="sequential")


def test_empty_calibration_text_is_refused():
    from shiftadd.calibration.text import token_windows

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1] * len(text.split())}

    with pytest.raises(ValueError, match="text has only 0 tokens"):
        token_windows(Tok(), [""], 16, 2)
    with pytest.raises(ValueError, match="need window >= 2 and count >= 1"):
        token_windows(Tok(), ["a b c"], 16, 0)


def test_mixed_bits_follow_the_allocation(tiny_onnx):
    from shiftadd.calibration.plan import plan_fit
    from shiftadd.quant import BCQConfig
    from shiftadd.quant.allocate import average_bits
    from shiftadd.relax_passes import rewrite_lut_matmul

    imported = import_onnx(tiny_onnx("llama"))
    batches = random_batches(4, 2, (1, 12))
    cfg = BCQConfig(bits=3, group=36)
    plan = plan_fit(imported, cfg, resolve_target("cpu"), batches=batches, mode="one-pass", avg_bits=2.5)
    a = plan.allocation
    assert average_bits(a.costs, a.bits) <= 2.5 and a.predicted_error() <= a.predicted_error(a.alternative) + 1e-12
    assert len(set(a.bits.values())) > 1
    _, _, rep = rewrite_lut_matmul(imported.mod, imported.params, cfg, fitted=plan.fitted, layer_bits=plan.layer_bits)
    assert {r.name: r.bits for r in rep.rewritten} == a.bits
    assert "| **average bits** |" in a.table()


def test_loss_aware_allocation_follows_the_fisher_weights(tiny_onnx):
    """A layer whose outputs the loss is (made) very sensitive to gets the most bits; the predicted
    errors are the Fisher-weighted output errors of the calibrated fits the plan then uses."""
    from shiftadd.calibration.plan import _layers, plan_fit
    from shiftadd.quant import BCQConfig
    from shiftadd.quant.allocate import output_error

    imported = import_onnx(tiny_onnx("llama"))
    batches = random_batches(5, 2, (1, 12))
    layers = dict(_layers(imported, ("lm_head",)))
    hot = "model.layers.0.self_attn.v_proj.weight"
    fisher = {n: np.full(w.shape[0], 1e6 if n == hot else 1e-6) for n, w in layers.items()}
    cfg = BCQConfig(bits=3, group=36, refits=1)
    plan = plan_fit(imported, cfg, resolve_target("cpu"), batches=batches, mode="one-pass", avg_bits=2.2, fisher=fisher)
    a = plan.allocation
    plain = plan_fit(imported, cfg, resolve_target("cpu"), batches=batches, mode="one-pass", avg_bits=2.2)
    assert a.bits[hot] == 4 and plain.allocation.bits[hot] < 4
    from shiftadd.calibration.hessians import calibrate

    h = calibrate(imported, batches, resolve_target("cpu"), ("lm_head",), mode="one-pass").hessians[hot]
    c = next(c for c in a.costs if c.name == hot)
    assert c.errors[4] == pytest.approx(
        output_error(layers[hot], plan.fitted[hot].dequantize(), h, fisher[hot]), rel=1e-9
    )
    with pytest.raises(ValueError, match=r"fisher weights of model.layers.0.self_attn.v_proj.weight: shape \[\d+\]"):
        plan_fit(
            imported,
            cfg,
            resolve_target("cpu"),
            batches=batches,
            mode="one-pass",
            avg_bits=2.2,
            fisher={**fisher, hot: np.ones(3)},
        )


def test_compile_allocates_loss_aware_from_a_hugging_face_model(tmp_path, monkeypatch):
    """End to end: a Hugging Face folder (tiny Llama with SmolLM2's tokenizer) compiled with a budget
    computes the Fisher from its gradients, allocates on it, and records it, loading the model once;
    --output-error-allocation and an ONNX input fall back to the plain output error."""
    import shiftadd.frontend.load as load

    folder = tmp_path / "tiny-hf"
    tiny_llama_folder(folder)
    loads = []
    monkeypatch.setattr(load, "load_hf_model", lambda spec, real=load.load_hf_model: loads.append(spec) or real(spec))
    kw = dict(group=36, windows=2, length=16, avg_bits=2.5, refits=1, kv_cache=False)
    res = shiftadd.compile(str(folder), tmp_path / "la.so", "q3", **kw)
    assert loads == [str(folder)]  # export, Fisher and the manifest from one load of the model
    assert res.manifest["allocation"]["predicted_error"] == "loss-aware (Fisher-weighted output error)"
    assert res.report.allocation is not None and res.manifest["avg_bits"] > 2.5  # scales come on top
    res2 = shiftadd.compile(str(folder), tmp_path / "oe.so", "q3", loss_aware=False, **kw)
    assert res2.manifest["allocation"]["predicted_error"] == "output error"
    # the two allocations rank layers differently only through the weights: same fits, other errors
    e1 = {c.name: c.errors for c in res.report.allocation.costs}
    e2 = {c.name: c.errors for c in res2.report.allocation.costs}
    assert e1.keys() == e2.keys() and any(
        e1[n][2] / e2[n][2] != pytest.approx(e1[m][2] / e2[m][2]) for n in e1 for m in e1
    )


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_hessians_on_the_source_model_equal_the_relax_capture(tiny_onnx, family):
    """calibration/torch_hessians.py (hooks on the torch model, windows batched) against the capture
    of our float TVM build, for every weight matmul of each family (GPT-2: Conv1D; OPT: Linear with
    bias)."""
    from shiftadd.calibration.plan import _layers
    from shiftadd.calibration.torch_hessians import hessians_from_torch

    model = _tiny(family)
    imported = import_onnx(tiny_onnx(family))
    layers = _layers(imported, ())
    names = [n for n, _ in layers]
    batches = random_batches(1, 11, (1, 13))  # 11 windows: a full batch of 8 and a ragged rest
    got = hessians_from_torch(model, batches, layers)
    assert got is not None
    hs, tokens, forwards, _ = got
    assert tokens == 11 * 13 and forwards == 2 and set(hs) == set(names)
    ref, ref_tokens = collect_hessians(imported, batches, resolve_target("cpu"), skip=())
    assert ref_tokens == tokens
    for name in names:
        np.testing.assert_allclose(hs[name], ref[name], rtol=1e-4, atol=1e-5 * np.abs(ref[name]).max())


def test_hessians_on_the_source_model_need_every_weight(tiny_onnx):
    from shiftadd.calibration.torch_hessians import hessians_from_torch

    model = _tiny("llama")
    up = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    batches = random_batches(2, 2, (1, 5))
    assert hessians_from_torch(model, batches, [("model.layers.0.mlp.up_proj.weight", up)]) is not None
    assert hessians_from_torch(model, batches, [("model.layers.0.mlp.up_proj.weight", up + 1)]) is None  # other values
    assert hessians_from_torch(model, batches, [("no.such.weight", up)]) is None
    emb = model.model.embed_tokens.weight.detach().numpy()
    assert hessians_from_torch(model, batches, [("model.embed_tokens.weight", emb)]) is None  # not a linear
