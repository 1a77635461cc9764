"""Digests of the params, logits and greedy ids that a fixed set of compile options gives on tiny
models: run it on two commits and diff the JSON files to show a refactor changed no behaviour.

    python scripts/golden_digests.py before.json      # on the old commit
    python scripts/golden_digests.py after.json       # on the new one; then: diff before.json after.json
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("SHIFTADD_TUNING_DB", os.path.join(tempfile.mkdtemp(), "tuning.json"))

import numpy as np  # noqa: E402

import shiftadd  # noqa: E402
from shiftadd.frontend import export_onnx  # noqa: E402
from tests.conftest import _tiny, ragged_batch, tiny_llama_folder  # noqa: E402

CASES = {  # name -> (model, preset, overrides); the tiny Llama's K are 72 and 100 (groups 24, 36)
    "onnx-llama-q3": ("llama", "q3", {"group": 24}),
    "onnx-opt-q3": ("opt", "q3", {}),
    "onnx-llama-q2": ("llama", "q2", {"group": 36}),
    "onnx-opt-q4": ("opt", "q4", {}),
    "onnx-opt-q4-tied": ("opt", "q4-tied", {"group": 32}),
    "onnx-llama-none": ("llama", "none", {}),
    "onnx-llama-f32": ("llama", "q3", {"kernel": "f32", "group": 36, "skip": ()}),
    "onnx-opt-f32": ("opt", "q3", {"kernel": "f32"}),
    "hf-q3": ("hf", "q3", {"group": 24}),
    "hf-q4-tied": ("hf", "q4-tied", {"group": 24, "skip": ()}),
    "hf-mix25": ("hf", "mix2.5", {"group": 24}),
    "hf-sequential-tuned": ("hf", "q3", {"mode": "sequential", "windows": 8, "tune_scales": 2, "group": 24}),
    "hf-O1": (
        "hf",
        "q3",
        {"stack_siblings": False, "share_kv": False, "attention": False, "int8_batch": False, "group": 24},
    ),
}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def main(out: str, only=()) -> dict:
    root = Path(tempfile.mkdtemp())
    models: dict[str, str] = {}
    res = {}
    for name, (kind, preset, kw) in CASES.items():
        if only and name not in only:
            continue
        if kind not in models:
            if kind == "hf":
                tiny_llama_folder(root / "hf")
                models[kind] = str(root / "hf")
            else:
                models[kind] = str(export_onnx(_tiny(kind), root / f"{kind}.onnx"))
        so = root / f"{name}.so"
        shiftadd.compile(models[kind], so, preset, **kw)
        sess = shiftadd.load(so)
        ids, mask = ragged_batch(0, 2, 7)
        ids = ids + (100 if kind == "hf" else 0)
        logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        gen = sess.generate(list(range(100, 108)), max_new_tokens=4)["new_ids"] if kind == "hf" else []
        res[name] = {
            "params": _digest(so.with_suffix(".params").read_bytes()),
            "logits": _digest(np.ascontiguousarray(logits).tobytes()),
            "ids": [int(t) for t in gen],
        }
        print(name, res[name], flush=True)
    Path(out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
