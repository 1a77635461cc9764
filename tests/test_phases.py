"""Seconds and peak memory per compile phase (shiftadd/phases.py)."""

import numpy as np

import shiftadd
from shiftadd.phases import Phases, _peak_mb, phase


def test_a_phase_records_its_own_peak():
    with Phases() as rec:
        with phase("small"):
            np.ones(1 << 10)
        with phase("big"):
            a = np.ones(50 << 20, np.float32)  # 200 MB touched
            a += 1
            del a
    small, big = rec.rows
    assert small["phase"] == "small" and big["phase"] == "big"
    assert big["peak_rss_mb"] >= small["peak_rss_mb"] + 150 if big["reset"] else big["peak_rss_mb"] >= 200
    assert rec.peak_mb() == max(small["peak_rss_mb"], big["peak_rss_mb"]) and _peak_mb() > 0
    with phase("outside"):  # no record open: nothing happens, nothing fails
        pass
    assert len(rec.rows) == 2


def test_compile_reports_its_phases(tiny_onnx, tmp_path):
    res = shiftadd.compile(tiny_onnx("llama"), tmp_path / "m.so", "q3", group=36)
    names = [r["phase"] for r in res.phases]
    assert names == ["import", "rewrite + lower", "build", "write"]
    assert all(r["seconds"] >= 0 and r["peak_rss_mb"] > 0 for r in res.phases)
    assert [r["phase"] for r in res.manifest["phases"]] == names[:-1]  # the manifest is written in "write"
