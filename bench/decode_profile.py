"""Where a decode step's time goes, and the LUT matmuls' own read rate (issue 24's M = 1 goal), by sampling.

bench/decode_bandwidth.py times the whole step against a plain read, so attention, norms, the VM and
the thread pool count against the matmuls. Here the default artifact's decode step (as there: the
in-place cache at 129 tokens, the Python session as a user gets it) runs under ``perf record``
(cpu-clock samples, CLOCK_MONOTONIC timestamps); the calling thread's samples during the timed steps
are split by where they fall: the LUT micro-kernel (tables and loop), our attention kernels, the
other compiled operators, TVM's runtime (VM, thread pool), Python and the OS. The LUT share of the
median step time is the LUT matmuls' time; their bytes over it is their read rate, set against a
plain 2-thread read of as many bytes in the same run (bench/read_probe.c, as decode_bandwidth.py).

    python bench/decode_profile.py [--so ARTIFACT.so] [--steps 1500]

Needs ``perf`` (Debian's linux-perf). Writes out/bench/decode_profile.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from _report import cpu_name, write_report

LUT_SYMBOLS = ("gemm_", "run_task", "build_tables", "group_sums", "shiftadd_lut")  # kernels/lut_avx2.cc
SAMPLE = re.compile(r"^\s*(\d+)\s+([\d.]+):\s+([0-9a-f]+)\s+(.*?)\s+\((.*)\)\s*$")
MMAP = re.compile(r"PERF_RECORD_MMAP2 .*\[(0x[0-9a-f]+)\((0x[0-9a-f]+)\) @ (0x[0-9a-f]+) .*\]: r-xp (.*)$")


def _bandwidth():
    """bench/decode_bandwidth.py as a module: its decode step, weight bytes, region and read probe."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "shiftadd_bench_bandwidth", Path(__file__).with_name("decode_bandwidth.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def child(so: Path, steps: int, out: Path) -> None:
    """Run under perf: warm up, then time ``steps`` steps; their window and thread go to ``out``."""
    import threading

    _, step, _ = _bandwidth().decode_step(so)
    for _ in range(50):
        step(100, 129)
    t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
    times = []
    for _ in range(steps):
        a = time.perf_counter()
        step(100, 129)
        times.append(time.perf_counter() - a)
    t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
    out.write_text(
        json.dumps({"t0": t0, "t1": t1, "tid": threading.get_native_id(), "ms": float(np.median(times)) * 1e3})
    )


def symbols(so: Path):
    """The artifact's own symbols (nm: local ones too, which perf leaves unnamed), as a lookup by address."""
    import bisect

    table = []
    for line in subprocess.run(
        ["nm", "-C", "--defined-only", str(so)], capture_output=True, text=True
    ).stdout.splitlines():
        p = line.split(None, 2)
        if len(p) == 3 and p[1].lower() == "t":
            table.append((int(p[0], 16), p[2]))
    table.sort()
    addrs = [t for t, _ in table]
    return lambda a: table[bisect.bisect_right(addrs, a) - 1][1] if addrs and a >= addrs[0] else "?"


def where(sym: str, dso: str, so_name: str) -> str:
    if so_name in dso:
        if any(s in sym for s in LUT_SYMBOLS):
            return "LUT matmuls (tables + loop)"
        if "shiftadd_" in sym:
            return "attention kernels (scores, softmax, values, cache append)"
        return "other compiled operators (norms, rotary, activations, adds)"
    if "libtvm" in dso:
        return "TVM runtime (VM, thread pool)"
    if "kernel" in dso:
        return "OS (scheduler, system calls)"
    if "python" in dso:
        return "Python"
    return "other libraries (libc, ...)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", default=None)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    so = Path(a.so) if a.so else _bandwidth().E2E_DEFAULTS
    if a.child:
        child(so, a.steps, Path(a.child))
        return 0
    if shutil.which("perf") is None:
        sys.exit("decode_profile: needs `perf` on PATH (Debian: linux-perf)")
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["shiftadd", "compile", "smollm2", "-o", str(so)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        data, info = Path(tmp) / "perf.data", Path(tmp) / "child.json"
        cmd = [sys.executable, __file__, "--so", str(so), "--steps", str(a.steps), "--child", str(info)]
        subprocess.run(
            ["perf", "record", "-q", "-F", "1999", "-k", "CLOCK_MONOTONIC", "-o", str(data), "--", *cmd], check=True
        )
        run = json.loads(info.read_text())
        script = subprocess.run(
            ["perf", "script", "-i", str(data), "-F", "tid,time,ip,sym,dso", "--show-mmap-events"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    lookup, maps = symbols(so), []
    shares = Counter()
    for line in script.splitlines():
        mm = MMAP.search(line)
        if mm and mm[4].endswith(so.name):
            maps.append((int(mm[1], 16), int(mm[2], 16), int(mm[3], 16)))
        m = SAMPLE.match(line)
        if m and int(m[1]) == run["tid"] and run["t0"] <= float(m[2]) <= run["t1"]:
            ip, sym = int(m[3], 16), m[4]
            for start, size, off in maps:  # the artifact's text: named from its own symbol table
                if start <= ip < start + size:
                    sym = lookup(ip - start + off)
            shares[where(sym, m[5], so.name)] += 1
    total = sum(shares.values())

    # the read floor, in this process, after the sampled run (never two things at once on 2 cores)
    bw = _bandwidth()
    sess, _, nbytes = bw.decode_step(so)
    buf = bw.region(nbytes, True)
    reader = bw.read_probe()
    for _ in range(20):
        reader(buf.ctypes.data, buf.nbytes, 0)
    reads = []
    for _ in range(a.reads):
        t = time.perf_counter()
        reader(buf.ctypes.data, buf.nbytes, 0)
        reads.append(time.perf_counter() - t)
    read_gbs = nbytes / float(np.median(reads)) / 1e9

    lut = "LUT matmuls (tables + loop)"
    lut_ms = run["ms"] * shares[lut] / total
    lines = [
        f"{so.name} on {cpu_name()}, {sess.threads} threads: decode step median {run['ms']:.3f} ms over "
        f"{a.steps} steps, {total} samples of the calling thread; {nbytes / 1e6:.2f} MB of LUT weights per step.",
        "",
        "| where the calling thread was | share of the step | ms per step |",
        "|---|---:|---:|",
    ]
    for k, v in shares.most_common():
        lines.append(f"| {k} | {v / total:.3f} | {run['ms'] * v / total:.3f} |")
    lut_gbs = nbytes / (lut_ms * 1e-3) / 1e9
    lines += [
        "",
        f"LUT matmuls: {lut_ms:.3f} ms per step = **{lut_gbs:.1f} GB/s**, {lut_gbs / read_gbs:.2f} of the same "
        f"run's plain 2-thread read of as many bytes ({read_gbs:.1f} GB/s, same buffer, huge pages, "
        f"median of {a.reads}).",
    ]
    text = "\n".join(lines)
    print(text)
    write_report(
        a.out,
        "decode_profile",
        text,
        {
            "cpu": cpu_name(),
            "bytes": nbytes,
            "step_ms": run["ms"],
            "shares": dict(shares),
            "samples": total,
            "lut_ms": lut_ms,
            "lut_gbs": lut_gbs,
            "read_gbs": read_gbs,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
