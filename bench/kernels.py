"""Kernel benchmark (issue 4): our LUT-add micro-kernel at 2/3/4 bits (AVX2, plus its AVX-512 paths
where the CPU has them) against ONNX Runtime's MatMulNBits (int2/int4, block 32/128, accuracy_level
4 = int8 activations and 0 = float), ONNX Runtime fp32 MatMul, torch fp32 and TVM fp32 (our default
CPU schedule), in one run.

Thread pools do not spin between calls (TVM_THREAD_POOL_SPIN_COUNT=0, OMP_WAIT_POLICY=PASSIVE, ORT
allow_spinning=0): spinning pools of one peer starve the next one on 2 cores.
Every number is the median over many interleaved calls (shiftadd/tuning/timing.py), each call on
one of several weight copies that together exceed the caches (--cold-mib), all on 2 threads. The
memory bandwidth is measured in the same run (2-thread streaming read) and each row reports its
share of the roofline (weight bytes read per call / bandwidth / time). A plain read of each width's
codes alone (bench/read_probe.c, launched like our kernels) is timed alongside: best ORT / that read
is the ceiling no format at those bits can pass on this machine. Our kernels use the tuning
database's knobs when it has them (shiftadd/tuning/search.py), else the defaults.

    python bench/kernels.py [--tune] [--shapes 4096x4096 ...] [--m 1 8 32] [--rounds 10] [--no-db]

Writes out/bench/kernels.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # only as the benchmark: never as a side effect of an import
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    # Three thread pools (TVM, ONNX Runtime, torch's OpenMP) share 2 cores here; each spins after its
    # work by default, which starves whichever runs next (measured: torch fp32 25x slower). Interleaved
    # timing needs them all to sleep when idle; every peer pays the same wake-up cost per call.
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from _report import write_report  # noqa: E402

from shiftadd.tuning.timing import copies_for, interleaved, median_ms  # noqa: E402

logger = logging.getLogger("shiftadd.bench")

SHAPES = ["4096x4096", "4096x11008", "11008x4096", "576x576", "576x1536", "1536x576", "576x49152"]  # K x N
THREADS = 2
GROUP = 64  # our compile default


def bandwidth_gbs(mib: int = 1024, reps: int = 9) -> float:
    """2-thread streaming read bandwidth (torch sum over a buffer far larger than the caches)."""
    import torch

    torch.set_num_threads(THREADS)
    a = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        float(a.sum())
        ts.append(time.perf_counter() - t0)
    return a.numel() * 4 / float(np.median(ts)) / 1e9


# -- peers ------------------------------------------------------------------------------------------
def _ort_session(model, threads=THREADS):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _bound(sess, x, n):
    """An IOBinding call (no per-call Python allocation) for ``sess`` on input x."""
    import onnxruntime as ort

    xv = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x))
    yv = ort.OrtValue.ortvalue_from_numpy(np.empty((x.shape[0], n), np.float32))
    b = sess.io_binding()
    b.bind_ortvalue_input("A", xv)
    b.bind_ortvalue_output("Y", yv)
    return lambda b=b, xv=xv, yv=yv, s=sess: s.run_with_iobinding(b)


def ort_nbits(k, n, bits, block, acc, copies, rng):
    """ONNX Runtime MatMulNBits sessions (symmetric, no zero points: its fastest form)."""
    from onnx import TensorProto, helper, numpy_helper

    nblk = -(-k // block)
    sessions, nbytes = [], 0
    for _ in range(copies):
        b = rng.integers(0, 256, (n, nblk, block * bits // 8), dtype=np.uint8)
        s = rng.random(n * nblk).astype(np.float32) * 0.01 + 1e-3
        node = helper.make_node(
            "MatMulNBits",
            ["A", "B", "scales"],
            ["Y"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=block,
            accuracy_level=acc,
        )
        g = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
            initializer=[numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "scales")],
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        sessions.append(_ort_session(m))
        nbytes = b.nbytes + s.nbytes
    return sessions, nbytes


def ort_fp32(k, n, copies, rng):
    from onnx import TensorProto, helper, numpy_helper

    sessions = []
    for _ in range(copies):
        w = rng.standard_normal((k, n), dtype=np.float32) * 0.02
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
        g = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
            initializer=[numpy_helper.from_array(w, "W")],
        )
        sessions.append(_ort_session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])))
    return sessions, k * n * 4


def tvm_fp32(k, n, copies, rng):
    """x [M, k] @ W [k, n] through shiftadd's own build (default pipeline + default CPU schedules)."""
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    from shiftadd.relax_passes.pipeline import build
    from shiftadd.schedules.targets import resolve_target
    from shiftadd.tuning.records import records

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor(("m", k), "float32"), w: R.Tensor((k, n), "float32")) -> R.Tensor(("m", n), "float32"):
            return R.matmul(x, w)

    tgt = resolve_target("cpu")
    vm = relax.VirtualMachine(build(Mod, tgt, records(None, tgt)), tvm.cpu())  # as compile builds
    ws = [tvm.runtime.tensor(rng.standard_normal((k, n), dtype=np.float32) * 0.02) for _ in range(copies)]
    return vm, ws


SCALE_FORMATS = ("fp16", "e5m2", "fp16-tied", "e5m2-tied")


def read_probe():
    """bench/read_probe.c built and loaded: ``(ptr, nbytes, tasks) -> int64``, a plain read of the bytes
    on TVM's thread pool, launched like our kernels (the floor under any kernel reading them)."""
    import ctypes
    import hashlib
    import tempfile

    import tvm  # noqa: F401  (the probe calls TVM's thread pool: libtvm_runtime must be loaded first)

    from shiftadd.schedules.native import compile_once

    src = Path(__file__).with_name("read_probe.c")
    cmd = [os.environ.get("CC", "cc"), "-O2", "-mavx2", "-fPIC"]
    key = hashlib.sha256(src.read_bytes() + " ".join(cmd).encode()).hexdigest()[:16]
    so = compile_once(Path(tempfile.gettempdir()) / f"shiftadd-read-probe-{key}.so", True, src, cmd)
    f = ctypes.CDLL(str(so)).shiftadd_read_probe
    f.restype, f.argtypes = ctypes.c_int64, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return f


def ours(k, n, bits, copies, rng, db, fp8=False, group=GROUP, tied=False):
    import tvm

    from shiftadd.schedules import lut_avx2 as L
    from shiftadd.schedules import lut_avx2_pack as P
    from shiftadd.schedules import native as N
    from shiftadd.schedules.lut_spec import LUTSpec
    from shiftadd.schedules.targets import resolve_target

    N.load_in_process()
    knobs = (
        db.knobs(k, n, bits, group, True, 1, fp8, tied)
        if db is not None  # else what an untuned compile gets
        else L.default_knobs(bits, N.int8_isa() == "avx512-vnni")
    )
    f = L.make_lut_avx2(k, n, bits, group, True, 1, *knobs, fp8=fp8, tied=tied)
    lib = tvm.compile(tvm.IRModule({"main": f}), resolve_target("cpu"))
    packs = [
        [tvm.runtime.tensor(a) for a in P.random_packed(LUTSpec(k, n, bits, group, True, 1, fp8, tied), rng)]
        for _ in range(copies)
    ]
    nbytes = sum(a.numpy().nbytes for a in packs[0])
    return lib["main"], packs, nbytes, knobs


# -- one shape --------------------------------------------------------------------------------------
def bench_shape(k, n, ms, args, bw_gbs, db, rng):
    import torch
    import tvm

    torch.set_num_threads(THREADS)
    cold = args.cold_mib * 2**20
    impls = {}  # name -> (bits or None, weight bytes, make(m) -> list of callables)

    for bits, fmt, group in ((b, f, g) for b in args.bits for f in args.scale_formats for g in args.groups):
        if group > k:  # one ragged group: nothing a smaller group would not show
            logger.info(f"{k}x{n}: group {group} > K, skipped")
            continue
        probe = copies_for(k * n * bits // 8, cold)
        fn, packs, nbytes, knobs = ours(
            k, n, bits, probe, rng, db, fmt.startswith("e5m2"), group, fmt.endswith("-tied")
        )
        name = (
            f"ours {bits}-bit"
            + (" e5m2" if fmt.startswith("e5m2") else "")
            + (" tied" if fmt.endswith("-tied") else "")
            + (f" g{group}" if group != GROUP else "")
        )
        impls[name] = (
            bits,
            nbytes,
            (
                lambda fn=fn, packs=packs, n=n: (
                    lambda m, x: [
                        (lambda p=p, y=tvm.runtime.empty((m, n), "float32"), xt=tvm.runtime.tensor(x): fn(xt, *p, y))
                        for p in packs
                    ]
                )
            ),
        )
    for bits in sorted({2 if b == 2 else 4 for b in args.bits}):
        for block in (32, 128):
            for acc in (4, 0):
                sess, nbytes = ort_nbits(k, n, bits, block, acc, copies_for(k * n * bits // 8, cold), rng)
                impls[f"ORT int{bits} b{block} acc{acc}"] = (
                    bits,
                    nbytes,
                    (lambda sess=sess, n=n: lambda m, x: [_bound(s, x, n) for s in sess]),
                )
    reader = read_probe()
    for bits in args.bits:  # the codes alone at each width: what no b-bit format can read faster
        nbytes = k * n * bits // 8
        bufs = [np.full(nbytes, 1, np.uint8) for _ in range(copies_for(nbytes, cold))]
        impls[f"read {bits}-bit codes"] = (
            bits,
            nbytes,
            lambda bufs=bufs: lambda m, x: [(lambda b=b: reader(b.ctypes.data, b.nbytes, 0)) for b in bufs],
        )
    sess, nbytes = ort_fp32(k, n, copies_for(k * n * 4, cold, 2), rng)
    impls["ORT fp32"] = (32, nbytes, lambda sess=sess, n=n: lambda m, x: [_bound(s, x, n) for s in sess])
    tw = [torch.randn(n, k) * 0.02 for _ in range(copies_for(k * n * 4, cold, 2))]
    impls["torch fp32"] = (
        32,
        k * n * 4,
        lambda tw=tw: (
            lambda m, x: [(lambda w=w, xt=torch.from_numpy(x): torch.nn.functional.linear(xt, w)) for w in tw]
        ),
    )
    vm, ws = tvm_fp32(k, n, copies_for(k * n * 4, cold, 2), rng)
    impls["TVM fp32"] = (
        32,
        k * n * 4,
        lambda vm=vm, ws=ws: lambda m, x: [(lambda w=w, xt=tvm.runtime.tensor(x): vm["main"](xt, w)) for w in ws],
    )

    rows = []
    for m in ms:
        x = rng.standard_normal((m, k), dtype=np.float32)
        # the plain read bounds calls that are bound by their bytes: M = 1 (at M > 1 arithmetic dominates)
        cands = {name: make()(m, x) for name, (_, _, make) in impls.items() if m == 1 or not name.startswith("read ")}
        with torch.inference_mode():
            times = interleaved(cands, rounds=args.rounds, budget_s=args.budget)
        for name, (bits, nbytes, _) in impls.items():
            if name not in times:
                continue
            t = median_ms(times[name])
            gbs = nbytes / (t / 1e3) / 1e9
            rows.append(
                {
                    "shape": f"{k}x{n}",
                    "k": k,
                    "n": n,
                    "m": m,
                    "impl": name,
                    "bits": bits,
                    "ms": t,
                    "p90_ms": float(np.percentile(times[name], 90) * 1e3),
                    "samples": len(times[name]),
                    "weight_bytes": nbytes,
                    "bits_per_weight": 8 * nbytes / (k * n),
                    "gbs": gbs,
                    "roofline": gbs / bw_gbs,
                }
            )
        logger.info(
            f"{k}x{n} M={m}: "
            + ", ".join(f"{r['impl']} {r['ms']:.3f}" for r in rows if r["m"] == m and r["shape"] == f"{k}x{n}")
        )
    return rows


def peer_ratios(rows):
    """For each of our rows: the best ORT MatMulNBits time at the same bits (3-bit: int4) / ours."""
    for r in rows:
        if not r["impl"].startswith("ours"):
            continue
        same = 4 if r["bits"] == 3 else r["bits"]
        peers = [
            p for p in rows if p["shape"] == r["shape"] and p["m"] == r["m"] and p["impl"].startswith(f"ORT int{same} ")
        ]
        best = min(peers, key=lambda p: p["ms"])
        r["best_peer"], r["speedup"] = best["impl"], best["ms"] / r["ms"]
        fp = [p for p in rows if p["shape"] == r["shape"] and p["m"] == r["m"] and p["bits"] == 32]
        bf = min(fp, key=lambda p: p["ms"])
        r["best_fp32"], r["speedup_fp32"] = bf["impl"], bf["ms"] / r["ms"]


def goals(rows) -> list[str]:
    out = []
    big = [s for s in {r["shape"] for r in rows} if s.startswith("4096") or s.startswith("11008")]
    for s in sorted(big):
        for m, bits, need, what in [
            (1, 2, 1.5, "M=1 2-bit >= 1.5x ORT int2"),
            (1, 4, 1.5, "M=1 4-bit >= 1.5x ORT int4"),
            (1, 3, 1.0, "M=1 3-bit faster than ORT int4"),
            (32, 4, 1.0, "M=32 4-bit no slower than ORT int4"),
        ]:
            r = [r for r in rows if r["shape"] == s and r["m"] == m and r["impl"].startswith(f"ours {bits}-bit")]
            if r:
                r = max(r, key=lambda x: x["speedup"])
                ok = r["speedup"] >= need
                same = {x["impl"]: x["ms"] for x in rows if x["shape"] == s and x["m"] == m}
                rd = same.get(f"read {bits}-bit codes")
                ceil = f"; ceiling {same[r['best_peer']] / rd:.2f}x" if rd else ""
                out.append(
                    f"| {s} | {what} | {r['speedup']:.2f}x ({r['impl']}) vs {r['best_peer']}{ceil} | "
                    f"{'met' if ok else 'MISSED'} |"
                )
    return out


def table(rows, bw) -> str:
    lines = [
        f"2-thread read bandwidth measured in this run: {bw:.1f} GB/s\n",
        "| K x N | M | impl | bits/w | median ms | p90 ms | GB/s | % roofline "
        "| speedup vs best same-bit ORT | vs best fp32 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        sp = f"{r['speedup']:.2f}x ({r['best_peer']})" if "speedup" in r else ""
        sf = f"{r['speedup_fp32']:.1f}x" if "speedup_fp32" in r else ""
        lines.append(
            f"| {r['shape']} | {r['m']} | {r['impl']} | {r['bits_per_weight']:.2f} | {r['ms']:.3f} | "
            f"{r['p90_ms']:.3f} | {r['gbs']:.1f} | {100 * r['roofline']:.0f} | {sp} | {sf} |"
        )
    lines += ["", "| shape | goal | measured | |", "|---|---|---|---|"] + goals(rows)
    return "\n".join(lines)


def summary(rows, bw) -> str:
    """One line per (shape, M): each of our variants and the best peer of each kind, in ms."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    ours = list(dict.fromkeys(r["impl"] for r in rows if r["impl"].startswith("ours")))
    widths = sorted({r["bits"] for r in rows if r["impl"].startswith("ours")})
    peers = sorted({2 if b == 2 else 4 for b in widths})
    reads = [b for b in widths if any(r["impl"] == f"read {b}-bit codes" for r in rows)]
    head = (
        "| K x N | M | "
        + " | ".join(ours)
        + "".join(f" | best ORT int{b}" for b in peers)
        + " | best fp32 | "
        + " | ".join(f"ours {b}-bit / best int{2 if b == 2 else 4}" for b in widths)
        + "".join(f" | read {b}-bit codes | ceiling {b}-bit" for b in reads)
        + " |"
    )
    lines = [
        f"2-thread read bandwidth measured in the run: {bw:.1f} GB/s; times in ms (median); "
        "speedups > 1 mean ours is faster (best of our scale formats and groups); ceiling: best ORT at "
        "the same bits / the plain read of the b-bit codes alone (what no b-bit format beats; timed at M = 1)\n",
        head,
        "|---|---:|" + "---:|" * (len(ours) + len(peers) + 1 + len(widths) + 2 * len(reads)),
    ]
    for s in shapes:
        for m in sorted({r["m"] for r in rows if r["shape"] == s}):
            rr = {r["impl"]: r for r in rows if r["shape"] == s and r["m"] == m}

            def best(prefix):
                c = [r for name, r in rr.items() if name.startswith(prefix)]
                return min(c, key=lambda r: r["ms"])

            bp = {b: best(f"ORT int{b} ") for b in peers}
            fp = min((r for r in rr.values() if r["bits"] == 32), key=lambda r: r["ms"])
            sp = [bp[2 if bits == 2 else 4]["ms"] / best(f"ours {bits}-bit")["ms"] for bits in widths]
            lines.append(
                f"| {s} | {m} | "
                + " | ".join(f"{rr[o]['ms']:.3f}" for o in ours)
                + "".join(f" | {bp[b]['ms']:.3f} ({bp[b]['impl'][9:]})" for b in peers)
                + f" | {fp['ms']:.3f} ({fp['impl']}) | "
                + " | ".join(f"{v:.2f}x" for v in sp)
                + "".join(
                    f" | {rr[f'read {b}-bit codes']['ms']:.3f} | "
                    f"{bp[2 if b == 2 else 4]['ms'] / rr[f'read {b}-bit codes']['ms']:.2f}x"
                    if f"read {b}-bit codes" in rr
                    else " | - | -"
                    for b in reads
                )
                + " |"
            )
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours_rows = [r for r in rows if "speedup" in r]
    cases = list(dict.fromkeys((r["shape"], r["m"]) for r in ours_rows))
    labels = [f"{s}\nM={m}" for s, m in cases]
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(labels) + 2), 4))
    width = 0.27
    for i, bits in enumerate((2, 3, 4)):  # the best of our scale formats and groups per case
        vals = [
            max((r["speedup"] for r in ours_rows if (r["shape"], r["m"]) == c and r["bits"] == bits), default=0.0)
            for c in cases
        ]
        ax.bar(np.arange(len(vals)) + (i - 1) * width, vals, width, label=f"ours {bits}-bit")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.5, color="r", lw=0.8, ls="--", label="1.5x goal (M=1)")
    ax.set_xticks(np.arange(len(labels)), labels, fontsize=7)
    ax.set_ylabel("speedup vs best ORT MatMulNBits\n(same bits; 3-bit vs int4)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="K x N shapes (default: the issue's seven)")
    ap.add_argument("--m", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds (each calls every weight copy)")
    ap.add_argument(
        "--budget",
        type=float,
        default=3.0,
        help="seconds of calls after which a (slow) candidate sits out further rounds",
    )
    ap.add_argument("--cold-mib", type=int, default=128, help="weight copies per candidate add up to this much")
    ap.add_argument("--db", default=None, help="tuning database to read knobs from (default: the user's)")
    ap.add_argument("--no-db", action="store_true", help="use the default knobs (what an untuned compile gets)")
    ap.add_argument("--tune", action="store_true", help="first tune our kernels missing from the database")
    ap.add_argument(
        "--scale-formats",
        nargs="+",
        default=["fp16", "e5m2"],
        choices=SCALE_FORMATS,
        help="our scale storage: float16 APoT (2 bytes) and/or float8 e5m2 (1 byte), per plane, "
        "or -tied: one scale per row and group, plane b's = it x 2^-b (compile --tied-scales)",
    )
    ap.add_argument(
        "--groups",
        nargs="+",
        type=int,
        default=[GROUP],
        help=f"our scale groups (inputs per scale; default {GROUP}, the compile default)",
    )
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4], choices=[2, 3, 4], help="our widths")
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--summary", metavar="JSON", help="only print the summary table of a saved kernels.json")
    a = ap.parse_args(argv)
    if any(g < 8 or g % 8 for g in a.groups):
        ap.error(
            f"--groups: each group must be a positive multiple of 8 inputs (the kernel's table pairs), got {a.groups}"
        )
    if a.summary:
        d = json.loads(Path(a.summary).read_text())
        peer_ratios(d["rows"])
        print(
            summary(d["rows"], d["bandwidth_gbs"])
            + "\n\n"
            + "\n".join(["| shape | goal | measured | |", "|---|---|---|---|"] + goals(d["rows"]))
        )
        return 0
    from shiftadd.tuning.database import TuningDB

    db = None if a.no_db else TuningDB.open(a.db)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes]
    if a.tune and db is not None:
        from shiftadd.tuning.search import tune_missing

        tune_missing(
            db,
            [
                (k, n, bits, g, True, 1, f.startswith("e5m2"), f.endswith("-tied"))
                for k, n in shapes
                for bits in a.bits
                for g in a.groups
                for f in a.scale_formats
            ],
        )
    rng = np.random.default_rng(0)
    bw = bandwidth_gbs()
    logger.info(
        f"bandwidth {bw:.1f} GB/s; TVM threads {os.environ.get('TVM_NUM_THREADS')}; "
        f"knobs from {'defaults' if db is None else db.path}"
    )
    rows = []
    import gc

    for k, n in shapes:
        rows += bench_shape(k, n, a.m, a, bw, db, rng)
        gc.collect()  # sessions and weight copies of the last shape (several GB) go before the next
    peer_ratios(rows)
    text = summary(rows, bw) + "\n\n" + table(rows, bw)
    print(text)
    out = write_report(a.out, "kernels", text, {"bandwidth_gbs": bw, "rows": rows})
    plot(rows, out / "kernels.png")
    logger.info(f"wrote {out / 'kernels.md'}, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
