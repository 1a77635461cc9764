"""TVM's thread count as a user gets it: every physical core unless told otherwise (TVM alone takes
half the logical CPUs), an explicit ``threads=`` / ``--threads`` narrowing it, in Python and in the
C++ runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from shiftadd.runtime.threads import physical_cores


def _lscpu_cores() -> int | None:
    """Cores by ``lscpu -p`` (an independent count: unique core and socket pairs), or None."""
    if shutil.which("lscpu") is None:
        return None
    out = subprocess.run(["lscpu", "-p=CORE,SOCKET,ONLINE"], capture_output=True, text=True).stdout
    rows = [ln.split(",") for ln in out.splitlines() if ln and not ln.startswith("#")]
    allowed = set(os.sched_getaffinity(0))
    cpus = subprocess.run(["lscpu", "-p=CPU"], capture_output=True, text=True).stdout
    ids = [int(ln) for ln in cpus.splitlines() if ln and not ln.startswith("#")]
    return len({(r[0], r[1]) for cpu, r in zip(ids, rows) if cpu in allowed}) or None


def test_physical_cores_agree_with_lscpu():
    want = _lscpu_cores()
    if want is None:
        pytest.skip("lscpu is not installed")
    assert physical_cores() == want


def _fresh(code: str, **env) -> str:
    """stdout of ``code`` in a fresh interpreter with $TVM_NUM_THREADS unset (then ``env`` added)."""
    e = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"} | env
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


NUM_THREADS = "import tvm; print(int(tvm.get_global_func('runtime.NumThreads')()))"


def test_import_sizes_the_pool_to_the_physical_cores():
    assert int(_fresh("import shiftadd; " + NUM_THREADS)) == physical_cores()
    assert int(_fresh("import shiftadd; " + NUM_THREADS, TVM_NUM_THREADS="1")) == 1  # the user's choice stays


def test_session_threads_narrow_the_pool(tiny_onnx, tmp_path):
    so = tmp_path / "m.so"
    import shiftadd

    shiftadd.compile(tiny_onnx("opt"), so, "none")
    code = (
        f"import shiftadd, numpy as np; s = shiftadd.load({str(so)!r}, threads=1); "
        "s.run(None, {'input_ids': np.ones((1, 3), np.int64), 'attention_mask': np.ones((1, 3), np.int64)}); "
        f"print(s.threads); {NUM_THREADS}"
    )
    assert _fresh(code).split() == ["1", "1"]
    with pytest.raises(ValueError, match="threads: expected a positive integer"):
        shiftadd.load(so, threads=0)


def test_runner_uses_every_physical_core_by_default(tiny_onnx, tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("the C++ runner needs cmake")
    import shiftadd
    from shiftadd.runtime.native import build_runner

    so = shiftadd.compile(tiny_onnx("opt"), tmp_path / "m.so", "none").so
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    r = subprocess.run(
        [str(build_runner()), str(so), "--ids", "1 2 3", "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    timing = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("timing:")).partition(":")[2])
    assert timing["threads"] == physical_cores()
