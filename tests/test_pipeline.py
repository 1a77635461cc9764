"""End to end on tiny models: ONNX -> Relax -> .so -> runtime, against ONNX Runtime."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import shiftadd
from shiftadd.frontend.onnx_import import name_weights

from .conftest import ragged_batch

FAMILIES = ["llama", "opt", "gpt2"]


def ort_logits(model_or_path, ids, mask):
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else model_or_path
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids, "attention_mask": mask}
    )[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_float_pipeline_equals_onnxruntime(family, tiny_onnx, tmp_path):
    path = tiny_onnx(family)
    res = shiftadd.compile(path, tmp_path / "m.so", quant="none")
    sess = shiftadd.load(res.so)
    for seed, (b, s) in enumerate([(2, 7), (1, 1), (3, 12)]):
        ids, mask = ragged_batch(seed, b, s) if b > 1 else (np.array([[5]], np.int64), np.ones((1, 1), np.int64))
        ours = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        ref = ort_logits(path, ids, mask)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1e-4


# kernel tolerance relative to the largest logit: float tables are exact to float rounding; the AVX2
# kernel's int8 tables (T-MAC's scheme) round each table entry to 1/254 of its unit's largest entry
TOLERANCE = {"f32": 1e-3, "avx2": 2e-2}


@pytest.mark.parametrize(
    "family, bits, kernel, fmt",
    [(f, b, "f32", "fp16") for f in FAMILIES for b in (2, 3, 4)]
    + [(f, 3, "avx2", "fp16") for f in FAMILIES]
    + [
        ("llama", 2, "avx2", "fp16"),
        ("opt", 4, "avx2", "e5m2"),
        ("llama", 3, "avx2", "e5m2"),
        ("opt", 4, "avx2", "e5m2+tied"),
        ("llama", 3, "avx2", "e5m2+tied"),
    ],
)
def test_rewrite_equals_onnxruntime_on_dequantized_weights(family, bits, kernel, fmt, tiny_onnx, tmp_path):
    path = tiny_onnx(family)
    # llama: K = 72 and 100, so rows of K=100 end in a shorter group; the AVX2 kernel wants group % 8 == 0
    group = (24 if kernel == "avx2" else 36) if family == "llama" else 32
    fmt, tied = fmt.split("+")[0], fmt.endswith("+tied")
    res = shiftadd.compile(
        path,
        tmp_path / "m.so",
        "q3",
        bits=bits,
        group=group,
        keep_dequantized=True,
        skip=() if family == "llama" else ("lm_head",),
        kernel=kernel,
        scale_format=fmt,
        tied=tied,
    )
    rep = res.report
    if fmt == "e5m2":  # one byte per scale and offset: the stored .alpha/.offset parameters are uint8
        import tvm

        from shiftadd.runtime.artifact import paths

        stored = tvm.runtime.load_param_dict(paths(res.so)["params"].read_bytes())
        scales = [v for name, v in stored.items() if name.endswith((".alpha", ".offset"))]
        assert scales and all(str(v.dtype) == "uint8" for v in scales)
        # tied: one stored scale per row and group ([NBA, NG, 1, 32]), per plane otherwise ([.., bits, 32])
        assert {v.shape[2] for name, v in stored.items() if name.endswith(".alpha")} == {1 if tied else bits}
    assert all(r.kernel == kernel for r in rep.rewritten) and res.manifest["kernel"] == kernel
    # every weight matmul is rewritten except the skipped lm_head (tied to the embedding in OPT/GPT-2)
    n_linear = {"llama": 2 * 7 + 1, "opt": 2 * 6, "gpt2": 2 * 4}[family]
    assert len(rep.rewritten) == n_linear
    assert all(r.reason == "skipped by pattern" for r in rep.kept)
    b, a = rep.weight_bytes()
    assert a < b
    # reference: the same ONNX file with each rewritten weight replaced by Σ α_b B_b (+ z)
    model = onnx.load(path)
    name_weights(model)
    replaced = 0
    for init in model.graph.initializer:
        if init.name in rep.dequantized:
            assert tuple(init.dims) == rep.dequantized[init.name].shape
            init.CopyFrom(numpy_helper.from_array(rep.dequantized[init.name].astype(np.float32), init.name))
            replaced += 1
    assert replaced == len(rep.rewritten)
    sess = shiftadd.load(res.so)
    ids, mask = ragged_batch(bits, 2, 9)
    ours = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    ref = ort_logits(model, ids, mask)
    assert np.abs(ours - ref).max() <= TOLERANCE[kernel] * np.abs(ref).max(), (
        np.abs(ours - ref).max(),
        np.abs(ref).max(),
    )
    # and the rewrite really changed the model (the float model differs)
    assert np.abs(ours - ort_logits(path, ids, mask)).max() > 1e-3


def test_fresh_process_run_and_generate(tiny_onnx, tmp_path):
    path = tiny_onnx("llama")
    res = shiftadd.compile(path, tmp_path / "m.so", "q3", bits=3, group=36)
    manifest = res.manifest
    assert manifest["quant"]["bits"] == 3 and manifest["quant"]["group"] == 36
    assert manifest["tvm_version"] and manifest["target"]["kind"] == "llvm" and manifest["files"]
    sess = shiftadd.load(res.so)
    gen = sess.generate([1, 2, 3], max_new_tokens=5)
    # greedy decoding by hand with the same session
    ids = [1, 2, 3]
    for _ in range(5):
        ids.append(int(np.argmax(sess.logits(np.array(ids))[0, -1])))
    assert gen["new_ids"] == ids[3:]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shiftadd.cli",
            "run",
            str(res.so),
            "--ids",
            "1 2 3",
            "--max-new-tokens",
            "5",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "new ids: " + " ".join(map(str, gen["new_ids"])) in out.stderr


def test_onnx_input_with_stored_tokenizer(tiny_onnx, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", eos_token="w1")
    res = shiftadd.compile(tiny_onnx("llama"), tmp_path / "m.so", "q3", bits=4, group=36, tokenizer=tok)
    sess = shiftadd.load(res.so)
    gen = sess.generate("w5 w7 w9", max_new_tokens=4)
    assert gen["prompt_ids"] == [5, 7, 9]
    assert gen["new_ids"] == shiftadd.load(res.so).generate([5, 7, 9], max_new_tokens=4)["new_ids"]
    assert gen["text"] == tok.decode(gen["new_ids"], skip_special_tokens=True)


def test_inputs_metadata_and_bad_feeds(tiny_onnx, tmp_path):
    res = shiftadd.compile(tiny_onnx("gpt2"), tmp_path / "m.so", "q3", bits=2, group=16)
    sess = shiftadd.load(res.so)
    assert [i.name for i in sess.inputs] == ["input_ids", "attention_mask"]
    assert sess.inputs[0].type == "int64" and len(sess.inputs[0].shape) == 2
    ids, mask = ragged_batch()
    with pytest.raises(TypeError, match="input 'input_ids': expected dtype int64"):
        sess.run(None, {"input_ids": ids.astype(np.int32), "attention_mask": mask})
    with pytest.raises(ValueError, match="expected rank 2"):
        sess.run(None, {"input_ids": ids[0], "attention_mask": mask})
    with pytest.raises(ValueError, match="missing input 'attention_mask'"):
        sess.run(None, {"input_ids": ids})
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\)"):
        sess.run(None, {"input_ids": ids + 1000, "attention_mask": mask})
    with pytest.raises(ValueError, match="unknown output"):
        sess.run(["nope"], {"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize(
    "family, layout, kernel",
    [(f, lay, "f32") for f in ("llama", "opt") for lay in ("block", "column")]
    + [("llama", "block", "avx2"), ("opt", "column", "avx2")],
)
def test_scale_layouts_run_exactly(family, layout, kernel, tiny_onnx, tmp_path):
    """Block-wise scales (one per 8 inputs x 16 rows; 32 for the AVX2 kernel, which reads whole 32-row
    blocks) and column-wise scales (one per input, fed to the kernel as pre-scaled activations) compute
    the dequantized model (exactly with float tables), with error feedback."""
    path = tiny_onnx(family)
    res = shiftadd.compile(
        path,
        tmp_path / "m.so",
        "q3",
        bits=3,
        layout=layout,
        block_rows=32 if kernel == "avx2" else 16,
        keep_dequantized=True,
        kernel=kernel,
    )
    rep = res.report
    assert rep.rewritten and all(r.layout == layout and r.kernel == kernel for r in rep.rewritten)
    model = onnx.load(path)
    name_weights(model)
    for init in model.graph.initializer:
        if init.name in rep.dequantized:
            init.CopyFrom(numpy_helper.from_array(rep.dequantized[init.name].astype(np.float32), init.name))
    ids, mask = ragged_batch(5, 2, 9)
    ours = shiftadd.load(res.so).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    ref = ort_logits(model, ids, mask)
    assert np.abs(ours - ref).max() <= TOLERANCE[kernel] * np.abs(ref).max(), (
        np.abs(ours - ref).max(),
        np.abs(ref).max(),
    )
    assert np.abs(ours - ort_logits(path, ids, mask)).max() > 1e-3
