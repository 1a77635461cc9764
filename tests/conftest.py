"""Shared fixtures: tiny randomly initialised Llama / OPT / GPT-2 models exported to ONNX once per run."""

from __future__ import annotations

import os
import socket
import tempfile

os.environ.setdefault("TVM_NUM_THREADS", "2")
# compiles in tests read (and --tune tests write) a database of their own, not the user's
os.environ.setdefault("SHIFTADD_TUNING_DB", os.path.join(tempfile.mkdtemp(prefix="shiftadd-test-db-"), "tuning.json"))

import logging

import numpy as np
import pytest

logging.getLogger("shiftadd").setLevel(logging.WARNING)  # progress lines off in tests

VOCAB = 96


def tiny_config(family: str, **overrides):
    """The config of a tiny test model (2 layers, 4 heads, 64 positions, VOCAB tokens); ``overrides``
    replace any of its fields."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    if family == "llama":  # K = 72 and 100: not multiples of 32; GQA
        config, fields = LlamaConfig, dict(common, hidden_size=72, intermediate_size=100, num_key_value_heads=2)
    elif family == "opt":  # Gemm(transB) fc1/fc2 with biases
        config, fields = OPTConfig, dict(common, hidden_size=64, ffn_dim=96, word_embed_proj_dim=64)
    elif family == "gpt2":  # Conv1D weights stored [K, N]; fused qkv
        config, fields = GPT2Config, dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    else:
        raise ValueError(family)
    return config(**{**fields, **overrides})


def _tiny(family: str):
    import torch
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, OPTForCausalLM

    config = tiny_config(family)
    torch.manual_seed(0)
    return {"llama": LlamaForCausalLM, "opt": OPTForCausalLM, "gpt2": GPT2LMHeadModel}[family](config).eval()


def tiny_llama_folder(folder, prepare=None):
    """A tiny Llama with SmolLM2's tokenizer (vocabulary) saved as a Hugging Face folder, for compiles
    that calibrate on text; ``prepare(model)`` may alter it first. Returns the model (skips the test
    when the packaged SmolLM2 is not installed)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from shiftadd.frontend import resolve_model

    try:
        src = resolve_model("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama", vocab_size=len(tok), tie_word_embeddings=True)).eval()
    if prepare is not None:
        model = prepare(model)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """family -> path of the exported ONNX file (exported on first use)."""
    from shiftadd.frontend import export_onnx

    cache: dict[str, str] = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = str(export_onnx(_tiny(family), root / f"{family}.onnx"))
        return cache[family]

    return get


def ragged_batch(seed: int = 0, batch: int = 2, seq: int = 7):
    """Token ids and a left-padded attention mask: row 1 is 3 tokens shorter."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick), for servers the tests start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
