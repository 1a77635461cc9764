"""Benchmark scripts change the process environment only when run as scripts: transformers probes
for a top-level ``kernels`` package and, with bench/ on sys.path, imported bench/kernels.py, whose
thread-pool settings then slowed every TVM call of the e2e benchmark's own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_importing_bench_kernels_leaves_thread_pools_alone():
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_THREAD_POOL_SPIN_COUNT", "OMP_WAIT_POLICY")}
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import kernels; "
            "print(os.environ.get('TVM_THREAD_POOL_SPIN_COUNT'), os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code, str(BENCH)], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]


def test_report_takes_bench_off_the_import_path():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _report, importlib.util; "
            "print(importlib.util.find_spec('kernels') is None or 'bench' not in importlib.util.find_spec('kernels').origin)")
    out = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
