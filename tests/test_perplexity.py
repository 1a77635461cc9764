"""Perplexity of a compiled .so and of an ONNX file (ONNX Runtime) against torch on the same windows;
the results folder accumulates rows and redraws its table and plots."""

import json

import numpy as np
import pytest
import torch

import shiftadd
from shiftadd.eval.perplexity import _Runner, perplexity, write_results

from .conftest import VOCAB, _tiny


def _torch_ppl(model, ids):
    nll = n = 0
    with torch.no_grad():
        for row in torch.from_numpy(ids):
            logits = model(input_ids=row[None]).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
            n += len(row) - 1
    return float(np.exp(nll / n))


def test_perplexity_matches_torch_for_so_and_onnx(tiny_onnx, tmp_path):
    ids = np.random.default_rng(0).integers(0, VOCAB, (3, 17)).astype(np.int64)
    ref = _torch_ppl(_tiny("llama"), ids)
    res = shiftadd.compile(tiny_onnx("llama"), tmp_path / "f.so", quant="none")
    for spec in (str(res.so), tiny_onnx("llama")):
        r = perplexity(_Runner(spec), ids, progress=False)
        assert r["tokens"] == 3 * 16
        assert r["ppl"] == pytest.approx(ref, rel=1e-4)
    q = shiftadd.compile(tiny_onnx("llama"), tmp_path / "q.so", "q3", bits=3, group=36)
    run = _Runner(str(q.so))
    assert 3 < run.avg_bits < 32 and run.weight_bytes == sum(r.bytes_after for r in q.report.rewritten)
    rq = perplexity(run, ids, progress=False)
    assert rq["ppl"] != pytest.approx(ref, rel=1e-6)  # a different (quantized) model, still finite
    assert np.isfinite(rq["ppl"])


def test_results_folder_accumulates_rows(tmp_path):
    base = {"text": "wiki", "windows": 2, "window": 8, "tokens": 14, "kind": "shiftadd", "weight_bytes": 10}
    write_results(
        tmp_path,
        {**base, "label": "a", "ppl": 20.0, "avg_bits": 3.0},
        {"model": "m", "layers": [{"bits": 3, "rel_error": 0.1}, {"bits": 2, "rel_error": 0.3}]},
    )
    write_results(tmp_path, {**base, "label": "f", "ppl": 10.0, "avg_bits": 32.0, "kind": "onnxruntime"})
    write_results(tmp_path, {**base, "label": "a", "ppl": 19.0, "avg_bits": 3.0})  # re-measured: replaces
    rows = json.loads((tmp_path / "perplexity.json").read_text())
    assert sorted((r["label"], r["ppl"]) for r in rows) == [("a", 19.0), ("f", 10.0)]
    md = (tmp_path / "perplexity.md").read_text()
    assert "| a | wiki | 2 x 8 | 19.000 | 3.000 |" in md
    for png in ("perplexity.png", "a-layers.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
