"""Load a compiled artifact with the TVM runtime and run it (ONNX-Runtime-like API + greedy generation).

Only the runtime is used here: no Relax compiler pass runs when loading.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import ArtifactError, paths, read_manifest


@dataclass(frozen=True)
class NodeArg:
    """Like ``onnxruntime.NodeArg``: name, dtype and (symbolic) shape of an input or output."""

    name: str
    type: str
    shape: list


class Session:
    """A loaded artifact. ``run(output_names, feed)`` like ONNX Runtime; ``generate()`` for LLMs."""

    def __init__(self, so_path: str | os.PathLike, verify: bool = True):
        import tvm
        from tvm import relax

        self.path = Path(so_path)
        self.manifest = read_manifest(self.path, verify=verify)
        p = paths(self.path)
        self.device = tvm.cpu(0)
        try:
            lib = tvm.runtime.load_module(str(p["so"]))
            self._vm = relax.VirtualMachine(lib, self.device)
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"{p['so']}: cannot be loaded by the TVM runtime: {str(e).splitlines()[0]}") from None
        try:
            blob = p["params"].read_bytes()
            loaded = tvm.runtime.load_param_dict(blob)
            self._params = [loaded[name] for name in self.manifest["params"]]
        except KeyError as e:
            raise ArtifactError(f"{p['params']}: weight {e} listed in the manifest is missing") from None
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"{p['params']}: cannot be read: {str(e).splitlines()[0]}") from None
        self._main = self._vm["main"]
        self.inputs = [NodeArg(i["name"], i["dtype"], i["shape"]) for i in self.manifest["inputs"]]
        self.outputs = [NodeArg(name, "float32", []) for name in self.manifest["outputs"]]
        self.tokenizer = None
        if self.manifest.get("tokenizer"):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(p["tokenizer"]))

    def get_inputs(self):
        return list(self.inputs)

    def get_outputs(self):
        return list(self.outputs)

    def _check_feed(self, feed: dict) -> list:
        import tvm

        names = [i.name for i in self.inputs]
        unknown = set(feed) - set(names)
        if unknown:
            raise ValueError(f"unknown input(s) {sorted(unknown)}; the model takes {names}")
        args = []
        for spec in self.inputs:
            if spec.name not in feed:
                raise ValueError(f"missing input '{spec.name}' ({spec.type}, shape {spec.shape})")
            a = np.asarray(feed[spec.name])
            if str(a.dtype) != spec.type:
                raise TypeError(f"input '{spec.name}': expected dtype {spec.type}, got {a.dtype}")
            if a.ndim != len(spec.shape):
                raise ValueError(f"input '{spec.name}': expected rank {len(spec.shape)} (shape {spec.shape}), got shape {a.shape}")
            for d, want in zip(a.shape, spec.shape):
                if want.isdigit() and int(want) != d:
                    raise ValueError(f"input '{spec.name}': expected shape {spec.shape}, got {a.shape}")
            if a.size == 0:
                raise ValueError(f"input '{spec.name}' is empty (shape {a.shape})")
            args.append(tvm.runtime.tensor(np.ascontiguousarray(a), self.device))
        return args

    def run(self, output_names, feed: dict) -> list[np.ndarray]:
        """Run the model; returns the requested outputs (all if ``output_names`` is None) as numpy."""
        args = self._check_feed(feed)
        vocab = self.manifest.get("vocab_size")
        if vocab and "input_ids" in feed:
            ids = np.asarray(feed["input_ids"])
            if ids.min() < 0 or ids.max() >= vocab:
                raise ValueError(f"input 'input_ids': token ids must be in [0, {vocab}), got range "
                                 f"[{ids.min()}, {ids.max()}]")
        out = self._main(*args, *self._params)
        outs = list(out) if not hasattr(out, "numpy") else [out]
        outs = [o.numpy() for o in outs]
        names = [o.name for o in self.outputs]
        if output_names is None:
            return outs
        missing = [n for n in output_names if n not in names]
        if missing:
            raise ValueError(f"unknown output(s) {missing}; the model has {names}")
        return [outs[names.index(n)] for n in output_names]

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        return self.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def generate(self, prompt, max_new_tokens: int = 32, stream=None) -> dict:
        """Greedy decoding. ``prompt`` is text (needs the stored tokenizer) or a list of token ids.
        Without a KV cache yet, every step reruns the whole sequence. ``stream(text_piece)`` is called
        per new token. Returns ids, text, and timings."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this artifact has no tokenizer: pass token ids instead of text")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        eos = set(self.manifest.get("eos_token_ids") or [])
        new: list[int] = []
        t0 = time.perf_counter()
        step_times = []
        for _ in range(max_new_tokens):
            ts = time.perf_counter()
            logits = self.logits(np.asarray(ids + new))
            step_times.append(time.perf_counter() - ts)
            nxt = int(np.argmax(logits[0, -1]))
            new.append(nxt)
            if stream is not None:
                stream(self.tokenizer.decode([nxt]) if self.tokenizer else f" {nxt}")
            if nxt in eos:
                break
        text = self.tokenizer.decode(new, skip_special_tokens=True) if self.tokenizer else None
        return {"prompt_ids": ids, "new_ids": new, "text": text, "seconds": time.perf_counter() - t0,
                "step_seconds": step_times}


def load(so_path: str | os.PathLike, verify: bool = True) -> Session:
    """Load an artifact written by :func:`shiftadd.compile` (checks its manifest and file hashes)."""
    return Session(so_path, verify=verify)
