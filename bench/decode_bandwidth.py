"""How close a decode step is to the machine's read bandwidth (issue 24's M = 1 goal), in one run.

A decode step of the default SmolLM2 artifact (``decode_step`` over the in-place cache at 129 tokens
of context, the Python session as a user gets it: weights in huge pages) reads every LUT weight once
(codes, scales, offsets). Its time against a plain 2-thread read of as many bytes (bench/read_probe.c
on TVM's thread pool, launched like our kernels) of one buffer read again and again as the step
reads its weights (in huge pages and in 4 KiB pages; part of it stays in the L3 cache), gives the
share of the read ceiling the whole step reaches (a read cycling over copies that exceed the caches
is the DRAM figure); the LUT matmuls alone reach more, since the step also
spends time on attention, norms and the VM. Medians over --calls calls, the two interleaved.

    python bench/decode_bandwidth.py [--so ARTIFACT.so] [--calls 400]

Without --so the defaults artifact of bench/e2e.py (out/e2e) is used, compiled if missing.
Writes out/bench/decode_bandwidth.{md,json}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _report import cpu_name, write_report

E2E_DEFAULTS = Path("out/e2e/smollm2-da39a3ee5e.so")  # bench/e2e.py's artifact of `shiftadd compile smollm2`
COLD_COPIES = 4


def region(nbytes: int, huge: bool) -> np.ndarray:
    """A buffer of ``nbytes`` ones, 2 MiB-aligned, in huge pages if asked (the session's own region)."""
    from shiftadd.runtime.huge_pages import huge_region

    buf = huge_region(nbytes, huge)[1]
    buf[:] = 1
    return buf


def decode_step(so: Path):
    """(session, ``step(token, length)`` over the in-place cache after a 128-token prompt, the LUT
    weights' bytes per step: codes, scales, offsets)."""
    import tvm

    import shiftadd
    from shiftadd.runtime.session import _InPlaceStep

    sess = shiftadd.load(so)
    spec = sess.functions["decode_step"]
    weights = dict(zip(spec["params"], sess._args["decode_step"]))
    lut = {n: t for n, t in weights.items() if n.endswith((".codes", ".alpha", ".offset"))}
    nbytes = sum(int(np.prod(t.shape)) * np.dtype(str(t.dtype)).itemsize for t in lut.values())
    ids = np.random.default_rng(0).integers(100, 40000, 128)[None].astype(np.int64)
    feed = sess._check_feed("prefill_last", {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    past = sess._call("kv_resize", [*sess._call("prefill_last", feed)[1:], tvm.runtime.ShapeTuple([256])])
    return sess, _InPlaceStep(sess._vm()["decode_step"], past, sess._args["decode_step"], sess.device, 256), nbytes


def read_probe():
    """bench/kernels.py's read probe (loaded under another name: a module called `kernels` is what
    transformers probes for)."""
    import importlib.util

    spec_k = importlib.util.spec_from_file_location("shiftadd_bench_kernels", Path(__file__).with_name("kernels.py"))
    kernels = importlib.util.module_from_spec(spec_k)
    spec_k.loader.exec_module(kernels)
    return kernels.read_probe()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", default=None)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--out", default="out/bench")
    a = ap.parse_args()
    so = Path(a.so) if a.so else E2E_DEFAULTS
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["shiftadd", "compile", "smollm2", "-o", str(so)], check=True)

    sess, step, nbytes = decode_step(so)
    reader = read_probe()
    bufs = {"huge pages": region(nbytes, True), "4 KiB pages": region(nbytes, False)}
    cold = [region(nbytes, True) for _ in range(COLD_COPIES)]  # one after the other: from DRAM, not L3
    turn = iter(range(1 << 62))
    calls = {
        "decode step": lambda: step(100, 129),
        **{f"read, same buffer, {k}": (lambda b=b: reader(b.ctypes.data, b.nbytes, 0)) for k, b in bufs.items()},
        f"read, {COLD_COPIES} copies in turn, huge pages": (
            lambda: (lambda b: reader(b.ctypes.data, b.nbytes, 0))(cold[next(turn) % COLD_COPIES])
        ),
    }
    times = {k: [] for k in calls}
    for _ in range(20):
        for f in calls.values():
            f()
    for _ in range(a.calls // 10):
        for k, f in calls.items():
            for _ in range(10):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    gbs = {k: nbytes / (v * 1e-3) / 1e9 for k, v in ms.items()}
    ceiling = max(v for k, v in gbs.items() if k.startswith("read, same buffer"))
    lines = [
        f"{so.name} on {cpu_name()}, {sess.threads} threads: {nbytes / 1e6:.2f} MB of LUT weights per decode "
        f"step (codes, scales, offsets), medians over {a.calls} interleaved calls.",
        "",
        "| what | ms | GB/s | share of the same-buffer read |",
        "|---|---:|---:|---:|",
    ]
    for k in calls:
        lines.append(f"| {k} | {ms[k]:.3f} | {gbs[k]:.1f} | {gbs[k] / ceiling:.2f} |")
    text = "\n".join(lines)
    print(text)
    write_report(a.out, "decode_bandwidth", text, {"cpu": cpu_name(), "bytes": nbytes, "ms": ms, "gbs": gbs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
