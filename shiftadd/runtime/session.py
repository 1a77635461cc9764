"""Load a compiled artifact with the TVM runtime and run it: ONNX-Runtime-like ``run()`` and, for LLMs,
``generate()`` with a KV cache (prefill once, then one token per step).

Only the runtime is used here: no Relax compiler pass runs when loading. One session serves many
Python threads: the loaded library and the weights are shared, each thread gets its own virtual
machine (a VM holds per-call register state, so two threads must not share one).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import ArtifactError, paths, read_manifest
from .sampling import Sampler, TextStream


@dataclass(frozen=True)
class NodeArg:
    """Like ``onnxruntime.NodeArg``: name, dtype and (symbolic) shape of an input or output."""

    name: str
    type: str
    shape: list


def _function_specs(manifest: dict) -> dict[str, dict]:
    """{function: {"inputs", "outputs", "params"}}; artifacts before the KV cache had ``main`` only."""
    funcs = manifest.get("functions")
    if funcs:
        return funcs
    return {"main": {"inputs": manifest["inputs"], "outputs": manifest["outputs"], "params": manifest["params"]}}


class Session:
    """A loaded artifact. ``run(output_names, feed)`` like ONNX Runtime; ``generate()`` for LLMs."""

    def __init__(self, so_path: str | os.PathLike, verify: bool = True, threads: int | None = None):
        """``threads``: TVM's worker threads (default every physical core, or ``$TVM_NUM_THREADS``)."""
        import tvm

        from .huge_pages import in_huge_pages
        from .threads import use_threads

        self.path = Path(so_path)
        self.manifest = read_manifest(self.path, verify=verify)
        p = paths(self.path)
        self.device = tvm.cpu(0)
        self.functions = _function_specs(self.manifest)
        try:
            self._lib = tvm.runtime.load_module(str(p["so"]))
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"{p['so']}: cannot be loaded by the TVM runtime: {str(e).splitlines()[0]}") from None
        self.threads = use_threads(threads)
        self._local = threading.local()
        self._vm()  # fail now, not on the first run, if the library is no VM executable
        try:
            loaded = tvm.runtime.load_param_dict_from_file(str(p["params"]))
            weights = {n: loaded[n] for n in self.manifest["params"]}  # one copy, shared by every function
            del loaded
            weights, self._weight_region = in_huge_pages(weights)  # faster streaming (runtime/huge_pages.py)
            self._args = {f: [weights[n] for n in spec["params"]] for f, spec in self.functions.items()}
        except KeyError as e:
            raise ArtifactError(f"{p['params']}: weight {e} listed in the manifest is missing") from None
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"{p['params']}: cannot be read: {str(e).splitlines()[0]}") from None
        main = self.functions["main"]
        self.inputs = [NodeArg(i["name"], i["dtype"], i["shape"]) for i in main["inputs"]]
        self.outputs = [NodeArg(name, "float32", []) for name in main["outputs"]]
        self.kv_cache = self.manifest.get("kv_cache") if "decode" in self.functions else None
        self.max_context = (self.kv_cache or {}).get("max_context")
        self.tokenizer = None
        if self.manifest.get("tokenizer"):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(p["tokenizer"]))

    def _vm(self):
        """This thread's virtual machine over the shared library."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            from tvm import relax

            try:
                vm = relax.VirtualMachine(self._lib, self.device)
            except Exception as e:  # noqa: BLE001
                raise ArtifactError(
                    f"{self.path}: not a shiftadd/TVM VM executable: {str(e).splitlines()[0]}"
                ) from None
            self._local.vm = vm
        return vm

    def get_inputs(self):
        return list(self.inputs)

    def get_outputs(self):
        return list(self.outputs)

    # -- run ----------------------------------------------------------------------------------------
    def _check_feed(self, function: str, feed: dict) -> list:
        import tvm

        if function not in self.functions:
            raise ValueError(f"unknown function '{function}'; the artifact has {sorted(self.functions)}")
        specs = self.functions[function]["inputs"]
        names = [i["name"] for i in specs]
        unknown = set(feed) - set(names)
        if unknown:
            raise ValueError(f"unknown input(s) {sorted(unknown)}; '{function}' takes {names}")
        sym: dict[str, tuple[str, int]] = {}  # symbolic dim -> (first input using it, its size)
        arrays = []
        for spec in specs:
            name, want_t, want_s = spec["name"], spec["dtype"], spec["shape"]
            if name not in feed:
                raise ValueError(f"missing input '{name}' ({want_t}, shape {want_s})")
            a = np.asarray(feed[name])
            if str(a.dtype) != want_t:
                raise TypeError(f"input '{name}': expected dtype {want_t}, got {a.dtype}")
            if a.ndim != len(want_s):
                raise ValueError(f"input '{name}': expected rank {len(want_s)} (shape {want_s}), got shape {a.shape}")
            if a.size == 0:
                raise ValueError(f"input '{name}' is empty (shape {a.shape})")
            for d, want in zip(a.shape, want_s):
                if want.isdigit() and int(want) != d:
                    raise ValueError(f"input '{name}': expected shape {want_s}, got {a.shape}")
                if want.isidentifier():
                    first = sym.setdefault(want, (name, d))
                    if first[1] != d:
                        raise ValueError(
                            f"input '{name}': dimension '{want}' is {d} but {first[1]} in input "
                            f"'{first[0]}' (shape {a.shape})"
                        )
            arrays.append(a)
        by_name = dict(zip(names, arrays))
        self._check_ids(by_name.get("input_ids"))
        past = by_name.get("past_key_values.0.key")
        if past is not None and "attention_mask" in by_name and "input_ids" in by_name:
            total = past.shape[2] + by_name["input_ids"].shape[1]  # the 'past' dim is shared by every layer
            if by_name["attention_mask"].shape[1] != total:
                raise ValueError(
                    f"input 'attention_mask': expected {total} columns (past {past.shape[2]} + "
                    f"new {by_name['input_ids'].shape[1]}), got shape {by_name['attention_mask'].shape}"
                )
        seq = by_name["attention_mask"].shape[1] if "attention_mask" in by_name else None
        if self.max_context and seq and seq > self.max_context:
            raise ValueError(
                f"input 'attention_mask': {seq} positions exceed the model's context of {self.max_context}"
            )
        return [tvm.runtime.tensor(np.asarray(a, order="C"), self.device) for a in arrays]

    def _check_ids(self, ids) -> None:
        vocab = self.manifest.get("vocab_size")
        if ids is None or not vocab:
            return
        ids = np.asarray(ids)
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(
                f"input 'input_ids': token ids must be in [0, {vocab}), got range [{ids.min()}, {ids.max()}]"
            )

    def _call(self, function: str, args: list) -> list:
        out = self._vm()[function](*args, *self._args[function])
        return list(out) if not hasattr(out, "numpy") else [out]

    def run(self, output_names, feed: dict, function: str = "main") -> list[np.ndarray]:
        """Run ``function`` (default ``main``); returns the requested outputs (all if ``output_names``
        is None) as numpy arrays."""
        outs = self._call(function, self._check_feed(function, feed))
        names = self.functions[function]["outputs"]
        if output_names is None:
            return [o.numpy() for o in outs]
        missing = [n for n in output_names if n not in names]
        if missing:
            raise ValueError(f"unknown output(s) {missing}; '{function}' has {names}")
        return [outs[names.index(n)].numpy() for n in output_names]

    def text_feed(self, texts) -> dict:
        """The feed of ``main`` for ``texts`` (one text or a list, padded to the longest) from the stored
        tokenizer: ``input_ids`` and whichever of ``attention_mask`` / ``token_type_ids`` the graph
        declares (an encoder's inputs in Optimum's conventions)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: has no tokenizer (compile with --tokenizer), feed arrays instead")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise ValueError("texts: expected one or more non-empty strings")
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        enc = tok(texts, padding=True, return_tensors="np")
        feed = {}
        for spec in self.inputs:
            if spec.name in enc:
                feed[spec.name] = np.asarray(enc[spec.name], dtype=spec.type)
            elif spec.name == "token_type_ids":
                feed[spec.name] = np.zeros(enc["input_ids"].shape, dtype=spec.type)
            else:
                raise ValueError(
                    f"input '{spec.name}' ({spec.type}, shape {spec.shape}) cannot be made from text: feed arrays"
                )
        return feed

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        return self.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]

    # -- generation ---------------------------------------------------------------------------------
    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this artifact has no tokenizer: pass token ids instead of text")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            try:
                ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
            except (TypeError, ValueError):
                raise TypeError(
                    f"prompt: expected text or a sequence of token ids, got {type(prompt).__name__}"
                ) from None
        if not ids:
            raise ValueError("prompt is empty")
        self._check_ids(np.asarray(ids))
        if self.max_context and len(ids) > self.max_context:
            raise ValueError(f"prompt: {len(ids)} tokens exceed the model's context of {self.max_context}")
        return ids

    def generate_ids(self, ids: list[int], max_new_tokens: int, sampler: Sampler, use_cache: bool = True):
        """Yield (token id, seconds of its step). With the cache: ``prefill_last`` (``main`` with the last
        position's logits only; ``main`` in older artifacts) on the prompt once (it also returns every
        layer's keys and values); ``kv_resize`` copies those into caches with room for every token
        to come, which ``decode_step`` then extends in place by one token per step. Artifacts
        without ``decode_step`` decode with ``decode_one`` (or ``decode``), which return the grown
        cache. Everything stays in TVM tensors between steps (no copies through numpy)."""
        import tvm

        eos = set(self.manifest.get("eos_token_ids") or [])
        limit = max_new_tokens if not self.max_context else min(max_new_tokens, self.max_context - len(ids))
        cached = use_cache and self.kv_cache is not None
        in_place = "decode_step" in self.functions
        step_fn = next((f for f in ("decode_step", "decode_one") if f in self.functions), "decode")
        prefill_fn = "prefill_last" if "prefill_last" in self.functions else "main"  # the last row's logits only
        seq, past = list(ids), None
        for step in range(limit):
            ts = time.perf_counter()
            if not cached:
                logits = self.logits(np.asarray(seq))[0, -1]
            elif past is None:
                ids_t = np.asarray([seq], dtype=np.int64)
                feed = {"input_ids": ids_t, "attention_mask": np.ones_like(ids_t)}
                out = self._call(prefill_fn, self._check_feed(prefill_fn, feed))
                logits, past = out[0].numpy()[0, -1], out[1:]
                if in_place and limit > 1:  # room for the tokens still to come
                    capacity = len(ids) + limit - 1
                    past = self._call("kv_resize", [*past, tvm.runtime.ShapeTuple([capacity])])
                    in_place = _InPlaceStep(self._vm()[step_fn], past, self._args[step_fn], self.device, capacity)
            elif in_place:
                logits = in_place(seq[-1], len(seq))
            else:
                new = tvm.runtime.tensor(np.asarray([[seq[-1]]], dtype=np.int64), self.device)
                mask = tvm.runtime.tensor(np.ones((1, len(seq)), dtype=np.int64), self.device)
                out = self._call(step_fn, [new, mask, *past])
                logits, past = out[0].numpy()[0, -1], out[1:]
            nxt = sampler(logits)
            seq.append(nxt)
            yield nxt, time.perf_counter() - ts
            if nxt in eos:
                return

    def generate(
        self,
        prompt,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stream=None,
        use_cache: bool = True,
    ) -> dict:
        """Generate after ``prompt`` (text, needs the stored tokenizer, or token ids), choosing tokens
        as :class:`Sampler` does (``temperature`` 0: greedy; same ``seed``, same tokens).
        ``stream(text_piece)`` is called as tokens arrive. ``use_cache=False`` reruns the whole
        sequence per token (the reference the cache must equal). Returns ids, text and timings."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        sampler = Sampler(temperature, top_k, top_p, seed)
        ids = self._prompt_ids(prompt)
        text = TextStream(self.tokenizer)
        new, steps = [], []
        t0 = time.perf_counter()
        for tok, dt in self.generate_ids(ids, max_new_tokens, sampler, use_cache):
            new.append(tok)
            steps.append(dt)
            piece = text.push(tok)
            if stream is not None and piece:
                stream(piece)
        return {
            "prompt_ids": ids,
            "new_ids": new,
            "text": text.text() if self.tokenizer else None,
            "seconds": time.perf_counter() - t0,
            "step_seconds": steps,
            "prefill_seconds": steps[0] if steps else 0.0,
            "decode_tokens_per_s": (len(steps) - 1) / sum(steps[1:]) if len(steps) > 1 else None,
        }


class _InPlaceStep:
    """``decode_step``'s arguments, kept across steps: its caches are written in place (never taken
    back from its outputs), the token and the mask are views updated without new tensors, so a step
    costs Python a few microseconds beside the call (new tensors and output wrappers were ~0.1 ms)."""

    def __init__(self, fn, caches, weights, device, capacity: int):
        import tvm

        self.fn, self.caches, self.weights = fn, list(caches), list(weights)
        self.token = tvm.runtime.empty((1, 1), "int64", device)
        self._token = np.from_dlpack(self.token)  # writable view of the token tensor
        self.ones = tvm.runtime.tensor(np.ones((1, capacity), dtype=np.int64), device)

    def __call__(self, token: int, length: int) -> np.ndarray:
        """The next-token logits after ``token``, the ``length``-th position of the sequence."""
        self._token[0, 0] = token
        out = self.fn(self.token, self.ones._create_view((1, length)), *self.caches, *self.weights)
        return np.from_dlpack(out[0])[0, -1]


def load(so_path: str | os.PathLike, verify: bool = True, threads: int | None = None) -> Session:
    """Load an artifact written by :func:`shiftadd.compile` (checks its manifest and file hashes);
    ``threads``: TVM's worker threads (default every physical core)."""
    return Session(so_path, verify=verify, threads=threads)
