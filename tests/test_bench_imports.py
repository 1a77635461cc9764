"""Benchmark scripts change the process environment only when run as scripts: transformers probes
for a top-level ``kernels`` package and, with bench/ on sys.path, imported bench/kernels.py, whose
thread-pool settings then slowed every TVM call of the e2e benchmark's own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_importing_bench_kernels_leaves_thread_pools_alone():
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_THREAD_POOL_SPIN_COUNT", "OMP_WAIT_POLICY")}
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); import kernels; "
        "print(os.environ.get('TVM_THREAD_POOL_SPIN_COUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(BENCH)], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]


def test_report_takes_bench_off_the_import_path():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import _report, importlib.util; "
        "spec = importlib.util.find_spec('kernels'); "
        "print(spec is None or 'bench' not in spec.origin)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_kernel_summary_covers_the_widths_and_groups_of_the_run():
    """bench/kernels.py --bits 2 4 --groups 64 512: the summary has a column per variant run, the best
    ORT peer per width, and each width's ratio from its fastest variant (here the g512 rows)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH / "kernels.py")
    sys.path.insert(0, str(BENCH))
    try:
        K = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(K)
    finally:
        if str(BENCH) in sys.path:  # _report takes it off itself
            sys.path.remove(str(BENCH))
    times = {
        "ours 2-bit e5m2": 0.24,
        "ours 2-bit e5m2 g512": 0.20,
        "ours 4-bit e5m2": 0.43,
        "ours 4-bit e5m2 g512": 0.35,
        "ORT int2 b128 acc4": 0.35,
        "ORT int2 b32 acc4": 0.6,
        "ORT int4 b128 acc4": 0.525,
        "ORT fp32": 2.3,
    }
    rows = [
        {
            "shape": "4096x4096",
            "m": 1,
            "impl": name,
            "ms": ms,
            "bits": 32 if "fp32" in name else int(name.split("int")[1][0]) if name.startswith("ORT") else int(name[5]),
        }
        for name, ms in times.items()
    ]
    K.peer_ratios(rows)
    text = K.summary(rows, 27.0)
    head, line = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert "best ORT int2 | best ORT int4 | best fp32 | ours 2-bit / best int2 | ours 4-bit / best int4 |" in head
    assert "3-bit" not in head
    assert line.endswith("| 1.75x | 1.50x |")  # 0.35 / 0.20 and 0.525 / 0.35
    assert any("M=1 4-bit >= 1.5x ORT int4 | 1.50x (ours 4-bit e5m2 g512)" in g for g in K.goals(rows))
    # with the plain reads of the codes: their time and the ceiling (best ORT / read) per width
    rows += [
        {"shape": "4096x4096", "m": 1, "impl": f"read {b}-bit codes", "ms": ms, "bits": b}
        for b, ms in ((2, 0.17), (4, 0.35))
    ]
    head, line = [ln for ln in K.summary(rows, 27.0).splitlines() if ln.startswith("| ")]
    assert head.endswith("| read 2-bit codes | ceiling 2-bit | read 4-bit codes | ceiling 4-bit |")
    assert line.endswith("| 1.75x | 1.50x | 0.170 | 2.06x | 0.350 | 1.50x |")  # 0.35 / 0.17, 0.525 / 0.35
    assert any("vs ORT int4 b128 acc4; ceiling 1.50x |" in g for g in K.goals(rows))
    m32 = [dict(r, m=32) for r in rows if not r["impl"].startswith("read ")]  # reads are timed at M = 1 only
    K.peer_ratios(m32)
    assert K.summary(rows + m32, 27.0).splitlines()[-1].endswith("| 1.75x | 1.50x | - | - | - | - |")
    with pytest.raises(SystemExit):  # a group the kernel cannot read: refused before any work
        K.main(["--groups", "100"])
