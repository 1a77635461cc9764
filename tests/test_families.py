"""The decoder families ``transformers`` offers that people deploy, as tiny random models: exported with
the KV cache, imported, the float compile equal to torch and the 3-bit compile's cached decode equal
to a full rerun and its prefill equal to ONNX Runtime on the model with the dequantized weights put back,
on a ragged left-padded batch longer than the sliding windows; a family that cannot
be exported fails at once with the feature it lacks named. docs/MODELS.md lists the results."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import VOCAB

WINDOW = 8  # sliding window of the local-attention families: shorter than the test sequences
SEQ = 14
ATTN = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {  # family -> (config class, model class, fields beyond 2 layers / VOCAB / 64 positions)
    "llama": ("LlamaConfig", "LlamaForCausalLM", ATTN),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(ATTN, sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", ATTN),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(ATTN, head_dim=16)),  # q/k norms
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(ATTN, pad_token_id=0)),  # fused qkv and gate/up
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(ATTN, num_key_value_heads=1, head_dim=16),
    ),  # scaled tied embeddings
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(ATTN, head_dim=16, sliding_window=WINDOW),
    ),  # local/global, soft-capping
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(ATTN, head_dim=16, sliding_window=WINDOW)),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, rotary_pct=0.25),
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(hidden_size=64, num_attention_heads=4),
    ),  # parallel attention + MLP
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", ATTN),  # partial rotary, LayerNorm
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", ATTN),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_head=4)),  # ALiBi
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_head=4, n_layer=2, n_positions=64)),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(hidden_size=64, ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=64),
    ),
}
UNSUPPORTED = {
    "mpt": (
        "MptConfig",
        "MptForCausalLM",
        dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2),
        "loses the shape of its attention scores",
    )
}


def _model(cls_names, fields):
    import torch
    import transformers

    config, model = (getattr(transformers, n) for n in cls_names)
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64)
    return model(config(**{**common, **fields})).eval()


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, (2, SEQ)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """family -> (torch model, saved Hugging Face folder)."""
    cache = {}
    root = tmp_path_factory.mktemp("families")

    def get(family):
        if family not in cache:
            config, model_cls, fields = FAMILIES[family]
            model = _model((config, model_cls), fields)
            model.save_pretrained(root / family)
            cache[family] = model, str(root / family)
        return cache[family]

    return get


def _close(got, want, tol=1e-4):
    return np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_compiles_equal_to_torch_and_decodes_with_cache(family, folder, tmp_path):
    import torch

    import shiftadd

    model, path = folder(family)
    ids, mask = _batch()
    sess = shiftadd.load(shiftadd.compile(path, tmp_path / "f.so", "none").so)
    got = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    with torch.no_grad():
        kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        try:
            want = model(**kw, position_ids=torch.tensor(pos)).logits.numpy()
        except TypeError:  # a family without position ids (ALiBi-free learned positions built from the mask)
            want = model(**kw).logits.numpy()
    assert _close(got[0], want[0]) and _close(got[1, 3:], want[1, 3:]), np.abs(got - want)[:, 3:].max()

    res = shiftadd.compile(path, tmp_path / "q.so", "q3", windows=0, group=32, keep_dequantized=True)
    sess = shiftadd.load(res.so)
    got = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    want = _onnxruntime_on(_dequantized(model, res.report.dequantized), ids, mask, tmp_path / "deq.onnx")
    err = np.abs(got - want)[:, 3:].max()  # the AVX2 kernel's int8 tables: tests/test_pipeline.py
    assert err <= 2e-2 * max(1.0, np.abs(want).max()), err
    assert len(res.report.rewritten) >= 2 * 4 and [r.name for r in res.report.kept] == ["lm_head.weight"]
    new = np.random.default_rng(1).integers(3, VOCAB, (2, 3)).astype(np.int64)
    logits, *past = sess.run(None, {"input_ids": ids, "attention_mask": mask})
    m, steps = mask, []
    for j in range(new.shape[1]):
        m = np.concatenate([m, np.ones((2, 1), np.int64)], 1)
        feed = {"input_ids": new[:, j : j + 1], "attention_mask": m, **dict(zip(sess.kv_cache["inputs"], past))}
        lg, *past = sess.run(None, feed, function="decode")
        steps.append(lg[:, -1])
    full = sess.run(["logits"], {"input_ids": np.concatenate([ids, new], 1), "attention_mask": m})[0]
    assert _close(np.stack(steps, 1), full[:, SEQ:])


def _dequantized(model, values: dict):
    """A copy of ``model`` with each rewritten weight replaced by its dequantized value. Report names are
    the module paths (``model.layers.0.mlp.up_proj.weight``); values are in the ONNX initializer's
    orientation, [K, N] for a MatMul of a Linear's transpose: the orientation nearer the original wins
    (square matrices included). The exporter may drop a leading ``model.`` (OPT)."""
    import copy

    import torch

    model = copy.deepcopy(model)
    state = dict(model.named_parameters())
    for name, value in values.items():
        (param,) = [state[name]] if name in state else [p for k, p in state.items() if k.endswith("." + name)]
        old = param.detach().numpy()
        new = (
            value
            if value.shape == old.shape
            and (value.shape != value.T.shape or np.abs(value - old).sum() <= np.abs(value.T - old).sum())
            else value.T
        )
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(new)))
    return model


def _onnxruntime_on(model, ids, mask, path):
    import onnxruntime as ort

    from shiftadd.frontend import export_onnx

    export_onnx(model, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_family_fails_at_once_naming_the_feature(family, tmp_path, monkeypatch):
    """Refused before the export (the first long step) starts."""
    import torch

    import shiftadd

    config, model_cls, fields, feature = UNSUPPORTED[family]
    _model((config, model_cls), fields).save_pretrained(tmp_path / family)

    def export(*a, **k):
        raise AssertionError("the export started")

    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.raises(ValueError, match=feature):
        shiftadd.compile(str(tmp_path / family), tmp_path / "x.so", "q3")
    assert not (tmp_path / "x.so").exists()
