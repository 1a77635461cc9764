"""Encoders and vision transformers as users export them: tiny random BERT, RoBERTa, DistilBERT, ViT and
DINOv2 models through ``torch.onnx.export`` (opset 17, dynamic batch and sequence; BERT also with
Optimum's ``token_type_ids``), compiled to ``main``: float equal to ONNX Runtime on the same file, the
low-bit rewrite equal to ONNX Runtime on the file with the dequantized weights put back."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import shiftadd
from shiftadd.frontend.onnx_import import name_weights

TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
VISION = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
MODELS = {  # kind -> (config class, model class, fields, input names)
    "bert": ("BertConfig", "BertModel", dict(TEXT, vocab_size=100), ["input_ids", "attention_mask"]),
    "bert_token_types": (
        "BertConfig",
        "BertModel",
        dict(TEXT, vocab_size=100),
        ["input_ids", "attention_mask", "token_type_ids"],
    ),
    "roberta": (
        "RobertaConfig",
        "RobertaModel",
        dict(TEXT, vocab_size=100, max_position_embeddings=70),
        ["input_ids", "attention_mask"],
    ),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertModel",
        dict(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=96),
        ["input_ids", "attention_mask"],
    ),
    "vit": ("ViTConfig", "ViTModel", dict(VISION, intermediate_size=96), ["pixel_values"]),
    "dinov2": ("Dinov2Config", "Dinov2Model", dict(VISION, mlp_ratio=2), ["pixel_values"]),
}


def _export(kind: str, path, dynamo: bool = False) -> str:
    """``torch.onnx.export`` as a user calls it: the TorchScript exporter with ``dynamic_axes``, or the
    ``torch.export``-based one (torch's default when onnxscript is installed) with ``dynamic_shapes``."""
    import torch
    import transformers

    config, model, fields, names = MODELS[kind]
    torch.manual_seed(0)
    net = getattr(transformers, model)(getattr(transformers, config)(**fields, attn_implementation="eager")).eval()

    class Outputs(torch.nn.Module):  # positional inputs in ``names`` order -> last_hidden_state
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, *xs):
            return self.net(**dict(zip(names, xs))).last_hidden_state

    feed = _feed(kind, 2, 5)
    dims = {n: ({0: "batch"} if n == "pixel_values" else {0: "batch", 1: "sequence"}) for n in names}
    args = tuple(torch.from_numpy(feed[n]) for n in names)
    common = dict(input_names=names, output_names=["last_hidden_state"], opset_version=17, dynamo=dynamo)
    if dynamo:
        dim = {"batch": torch.export.Dim("batch"), "sequence": torch.export.Dim("sequence")}
        shapes = (tuple({axis: dim[d] for axis, d in dims[n].items()} for n in names),)
        torch.onnx.export(Outputs(), args, str(path), dynamic_shapes=shapes, **common)
    else:
        axes = {**dims, "last_hidden_state": {0: "batch"}}
        torch.onnx.export(Outputs(), args, str(path), dynamic_axes=axes, **common)
    return str(path)


def _feed(kind: str, batch: int, seq: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    names = MODELS[kind][3]
    if names == ["pixel_values"]:
        return {"pixel_values": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}
    mask = np.ones((batch, seq), np.int64)
    mask[-1, seq // 2 :] = 0  # the last row padded on the right, as tokenizers pad encoders
    feed = {"input_ids": rng.integers(0, 100, (batch, seq)).astype(np.int64), "attention_mask": mask}
    if "token_type_ids" in names:
        feed["token_type_ids"] = (np.arange(seq) >= seq // 3).astype(np.int64)[None].repeat(batch, 0)
    return feed


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("encoders"), {}

    def get(kind, dynamo=False):
        if (kind, dynamo) not in cache:
            cache[kind, dynamo] = _export(kind, root / f"{kind}{'-dynamo' if dynamo else ''}.onnx", dynamo)
        return cache[kind, dynamo]

    return get


def _ort(model, feed):
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _valid(kind, feed, x):
    """The rows a padded encoder's output defines: padded positions hold whatever attention gives them."""
    if "attention_mask" not in feed:
        return x
    return x[feed["attention_mask"].astype(bool)]


@pytest.mark.parametrize(
    "kind, dynamo", [(k, False) for k in sorted(MODELS)] + [("bert_token_types", True), ("dinov2", True)]
)
def test_float_compile_equals_onnxruntime(kind, dynamo, exported, tmp_path):
    """BERT here is the regression test of issue 23's 'slot->value_computed' build failure: its mask's
    ``Range(0, batch)`` became a length read back from a tensor mid-function. The dynamo exports keep
    constants as 0-d initializers (a 0-d weight once became 1-d in the params file)."""
    path = exported(kind, dynamo)
    sess = shiftadd.load(shiftadd.compile(path, tmp_path / "f.so", "none").so)
    assert [i.name for i in sess.get_inputs()] == MODELS[kind][3]
    for batch, seq in [(2, 7), (3, 12), (1, 1)]:
        feed = _feed(kind, batch, seq, seed=seq)
        if batch == 1 and "attention_mask" in feed:
            feed["attention_mask"][:] = 1
        got, want = sess.run(None, feed)[0], _ort(path, feed)
        assert got.shape == want.shape
        np.testing.assert_allclose(_valid(kind, feed, got), _valid(kind, feed, want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind, kernel", [(k, "f32") for k in sorted(MODELS)] + [("bert", "avx2"), ("vit", "avx2")])
def test_rewrite_equals_onnxruntime_on_dequantized_weights(kind, kernel, exported, tmp_path):
    path = exported(kind)
    res = shiftadd.compile(path, tmp_path / "q.so", "q3", group=32, kernel=kernel, keep_dequantized=True)
    rep = res.report
    assert len(rep.rewritten) == 2 * 6 and not rep.kept  # q, k, v, o, up, down per layer
    model = onnx.load(path)
    name_weights(model)
    for init in model.graph.initializer:
        if init.name in rep.dequantized:
            init.CopyFrom(numpy_helper.from_array(rep.dequantized[init.name].astype(np.float32), init.name))
    feed = _feed(kind, 2, 9, seed=1)
    got, want = shiftadd.load(res.so).run(None, feed)[0], _ort(model, feed)
    err = np.abs(_valid(kind, feed, got) - _valid(kind, feed, want)).max()
    tol = {"f32": 1e-4, "avx2": 2e-2}[kernel]  # the AVX2 kernel's int8 tables: docs/ENGINEERING.md
    assert err <= tol * max(1.0, np.abs(want).max()), err
    assert np.abs(got - _ort(path, feed)).max() > 1e-3  # the rewrite changed the model


def test_cli_runs_an_encoder_on_texts_and_a_vision_model_on_arrays(tmp_path):
    """``shiftadd run --text`` tokenizes with the stored tokenizer into the inputs the graph declares
    (``token_type_ids`` included); ``--input NAME=FILE.npy`` feeds arrays; ``--output`` saves them."""
    import subprocess
    import sys

    import torch
    import transformers

    from shiftadd.frontend import resolve_model

    try:
        src = resolve_model("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = transformers.AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    names = MODELS["bert_token_types"][3]
    torch.manual_seed(0)
    net = transformers.BertModel(transformers.BertConfig(**dict(TEXT, vocab_size=len(tok)))).eval()

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, *xs):
            return self.net(**dict(zip(names, xs))).last_hidden_state

    path = tmp_path / "enc.onnx"
    ids = torch.ones((1, 4), dtype=torch.int64)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    torch.onnx.export(Outputs(), (ids, ids, ids * 0), str(path), input_names=names, dynamic_axes=axes, dynamo=False)
    so = shiftadd.compile(str(path), tmp_path / "enc.so", "q4", tokenizer="smollm2").so
    texts = ["The capital of France is", "Hi"]
    cmd = [sys.executable, "-m", "shiftadd.cli", "run", str(so), "--output", str(tmp_path / "o.npz")]
    r = subprocess.run(cmd + ["--text", texts[0], "--text", texts[1]], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "float32 [2, " in r.stdout
    got = np.load(tmp_path / "o.npz")
    feed = shiftadd.load(so).text_feed(texts)
    assert set(feed) == set(names) and feed["attention_mask"][1].sum() < feed["attention_mask"][0].sum()
    (want,) = shiftadd.load(so).run(None, feed)
    np.testing.assert_array_equal(got[got.files[0]], want)

    vit = _export("vit", tmp_path / "vit.onnx")
    vso = shiftadd.compile(vit, tmp_path / "vit.so", "none").so
    pixels = _feed("vit", 2, 0)["pixel_values"]
    np.save(tmp_path / "px.npy", pixels)
    cmd = [sys.executable, "-m", "shiftadd.cli", "run", str(vso), "--input", f"pixel_values={tmp_path / 'px.npy'}"]
    r = subprocess.run(cmd + ["--output", str(tmp_path / "v.npz")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "v.npz")
    np.testing.assert_allclose(got[got.files[0]], _ort(vit, {"pixel_values": pixels}), rtol=1e-4, atol=1e-4)
