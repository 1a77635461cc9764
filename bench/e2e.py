"""End-to-end generation speed (issues 4 and 5): SmolLM2-135M compiled by shiftadd at 2/3/4 bits with
the KV cache, against the same model in ONNX Runtime fp32 and ONNX Runtime int4 (MatMulNBits, RTN
block 128, accuracy_level 4), both with their own KV cache: the same prefill/decode ONNX graphs our
compile starts from (``export_onnx_with_cache``), each layer's ``present.{i}.key/value`` passed back
as ``past_key_values.{i}.key/value`` each step, as ONNX Runtime users do. Every weight matmul is
low-bit in the quantized rows (lm_head included: it is the largest matmul).

One generation = prefill of --prompt tokens, then --new tokens decoded greedily one at a time.
Rounds alternate the models; decode ms/token is the median over all steps of all rounds. Also:
ours without the cache (every step reruns the whole sequence: --nocache-steps steps), and the C++
runner ``shiftadd-run`` (start-up time, peak memory) against the Python session on the same artifact.

    python bench/e2e.py [--bits 2 3 4] [--tied 4] [--rounds 5] [--prompt 128] [--new 32]

Writes out/bench/e2e.{md,json,png}; exported graphs and compiled models are kept in --work and reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
from _report import figure, write_report  # noqa: E402

from shiftadd.runtime.artifact import atomic_path  # noqa: E402

logger = logging.getLogger("shiftadd.bench")

THREADS = 2
TUNE = True  # compile --tune: kernels missing from the database are tuned first (same spin settings as here)


def source_graphs(work: Path) -> tuple[Path, Path]:
    """SmolLM2's prefill and decode graphs (float32, KV cache as one tensor)."""
    from shiftadd.frontend import export_onnx_with_cache, load_hf_model

    folder = work / "smollm2-kv"
    if not (folder / "decode.onnx").exists():
        folder.mkdir(parents=True, exist_ok=True)
        model, _, _ = load_hf_model("smollm2")
        export_onnx_with_cache(model, folder)
    return folder / "prefill.onnx", folder / "decode.onnx"


def ort_int4(src: Path) -> Path:
    """ONNX Runtime's own int4 quantizer (RTN, symmetric, block 128, int8 compute), every MatMul."""
    dst = src.with_name(src.stem + "-int4-b128-acc4.onnx")
    if dst.exists():
        return dst
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    cfg = mq.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=4, bits=4)
    q = mq.MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=4, block_size=128, is_symmetric=True, accuracy_level=4, algo_config=cfg
    )
    q.process()
    with atomic_path(dst) as tmp:
        onnx.save(q.model.model if hasattr(q.model, "model") else q.model, str(tmp), save_as_external_data=False)
    return dst


def ours(work: Path, bits: int, plain: bool = False, tied: bool = False) -> Path:
    """``plain``: without the decode-time passes (stacked sibling LUT calls, K/V read once per head
    group, our attention kernels over the cache), for the ablation row. ``tied``: tied e5m2 scales per
    128 inputs (`--tied-scales --scale-format e5m2 --group 128`: 4.125 bits at 4 bits, ORT int4 b128's
    block; the format whose calibrated quality beats ORT int4's, docs/QUALITY.md)."""
    import shiftadd

    so = work / f"ours-{bits}bit-{'plain' if plain else 'stacked'}{'-tied-e5m2-g128' if tied else ''}.so"
    if not so.exists():  # weight-only fit: this benchmark measures speed, docs/QUALITY.md measures quality
        fmt = dict(tied=True, scale_format="e5m2", group=128) if tied else {}
        shiftadd.compile(
            "smollm2",
            so,
            bits=bits,
            skip=(),
            windows=0,
            tune=TUNE,
            stack_siblings=not plain,
            share_kv=not plain,
            attention=not plain,
            **fmt,
        )
    return so


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OrtGenerator:
    """Greedy generation with ONNX Runtime and the KV cache: prefill graph once, decode graph per token."""

    def __init__(self, prefill: Path, decode: Path):
        self.pre, self.dec = ort_session(prefill), ort_session(decode)
        self.past_names = [i.name for i in self.dec.get_inputs()][2:]

    def __call__(self, ids: np.ndarray, new: int) -> list[float]:
        times = []
        t = time.perf_counter()
        logits, *past = self.pre.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        n = ids.shape[1]
        for _ in range(new - 1):
            nxt = np.array([[int(np.argmax(logits[0, -1]))]], np.int64)
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            n += 1
            logits, *past = self.dec.run(
                None,
                {"input_ids": nxt, "attention_mask": np.ones((1, n), np.int64), **dict(zip(self.past_names, past))},
            )
        times.append(time.perf_counter() - t)
        return times


class OursGenerator:
    def __init__(self, so: Path, use_cache: bool = True):
        import shiftadd
        from shiftadd.runtime.sampling import Sampler

        self.sess, self.use_cache, self.sampler = shiftadd.load(so), use_cache, Sampler()

    def __call__(self, ids: np.ndarray, new: int) -> list[float]:
        return [dt for _, dt in self.sess.generate_ids(ids[0].tolist(), new, self.sampler, self.use_cache)]


def runner_vs_python(so: Path, ids: list[int], new: int, reps: int) -> list[dict]:
    """Start-up and peak memory of a fresh process: the C++ runner vs ``shiftadd.load`` + generate. Peak
    memory is VmHWM (ru_maxrss of a child counts this big parent's memory at fork time on Linux)."""
    from shiftadd.runtime.native import build_runner, run_runner

    binary = build_runner()
    probe = (
        "import json,re,sys,time; t=time.perf_counter(); import shiftadd; s=shiftadd.load(sys.argv[1]); "
        "t1=time.perf_counter(); r=s.generate([int(x) for x in sys.argv[2].split()], int(sys.argv[3])); "
        "d=r['step_seconds']; print(json.dumps({'load_s': t1-t, 'prefill_ms': d[0]*1e3, "
        "'decode_ms_per_token': sorted(d[1:])[len(d[1:])//2]*1e3 if len(d)>1 else None, 'ids': r['new_ids'], "
        "'peak_rss_mb': int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))/1024}))"
    )
    rows = {"C++ runner (shiftadd-run)": [], "Python (shiftadd.load)": []}
    for _ in range(reps):
        out = run_runner(so, ids, new, threads=THREADS, binary=binary)
        rows["C++ runner (shiftadd-run)"].append({**out["timing"], "ids": out["ids"]})
        r = subprocess.run(
            [sys.executable, "-c", probe, str(so), " ".join(map(str, ids)), str(new)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows["Python (shiftadd.load)"].append(json.loads(r.stdout.strip().splitlines()[-1]))
    same = all(a["ids"] == b["ids"] for a, b in zip(*rows.values()))
    return [
        {
            "process": k,
            "same_ids": same,
            **{
                m: float(np.median([x[m] for x in v]))
                for m in ("load_s", "prefill_ms", "decode_ms_per_token", "peak_rss_mb")
            },
        }
        for k, v in rows.items()
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("--new", type=int, default=32, help="tokens generated per round")
    ap.add_argument("--nocache-steps", type=int, default=4, help="steps of ours without the cache (each reruns all)")
    ap.add_argument("--runner-reps", type=int, default=3)
    ap.add_argument(
        "--tied",
        nargs="*",
        type=int,
        default=[],
        metavar="BITS",
        help="also these widths with tied e5m2 scales per 128 inputs (compile --tied-scales)",
    )
    ap.add_argument("--work", default="out/e2e")
    ap.add_argument("--out", default="out/bench")
    a = ap.parse_args(argv)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prefill, decode = source_graphs(work)
    gens = {f"ours {b}-bit": OursGenerator(ours(work, b)) for b in a.bits}
    gens.update({f"ours {b}-bit tied e5m2 g128": OursGenerator(ours(work, b, tied=True)) for b in a.tied})
    ref_bits = 3 if 3 in a.bits else a.bits[0]
    gens[f"ours {ref_bits}-bit, no KV cache"] = OursGenerator(ours(work, ref_bits), use_cache=False)
    gens[f"ours {ref_bits}-bit, separate LUT calls, K/V copied per head, generic attention"] = OursGenerator(
        ours(work, ref_bits, plain=True)
    )
    gens["ORT fp32"] = OrtGenerator(prefill, decode)
    gens["ORT int4 b128 acc4"] = OrtGenerator(ort_int4(prefill), ort_int4(decode))
    ids = np.random.default_rng(0).integers(100, 40000, (1, a.prompt)).astype(np.int64)
    steps: dict[str, list[list[float]]] = {k: [] for k in gens}
    for name, g in gens.items():  # warm-up: first calls allocate and page weights in
        g(ids, 2)
    for r in range(a.rounds):
        logger.info(f"round {r + 1}/{a.rounds}")
        for name in list(gens) if r % 2 == 0 else list(gens)[::-1]:
            steps[name].append(gens[name](ids, a.nocache_steps if "no KV" in name else a.new))
    rows = []
    for name, runs in steps.items():
        dec = [t for run in runs for t in run[1:]]
        rows.append(
            {
                "model": name,
                "prefill_ms": float(np.median([run[0] for run in runs]) * 1e3),
                "decode_ms": float(np.median(dec) * 1e3),
                "decode_p90_ms": float(np.percentile(dec, 90) * 1e3),
                "decode_samples": len(dec),
            }
        )
    by = {r["model"]: r for r in rows}
    for r in rows:
        r["tokens_per_s"] = 1e3 / r["decode_ms"]
        r["vs_ort_int4"] = by["ORT int4 b128 acc4"]["decode_ms"] / r["decode_ms"]
        r["vs_ort_fp32"] = by["ORT fp32"]["decode_ms"] / r["decode_ms"]
    logger.info("C++ runner vs Python session (fresh processes)")
    proc = runner_vs_python(ours(work, ref_bits), ids[0, :16].tolist(), 16, a.runner_reps)
    lines = [
        f"SmolLM2-135M, {THREADS} threads; prompt {a.prompt} tokens, then {a.new} tokens decoded greedily "
        f"(decode = median over {a.rounds} rounds x steps)\n",
        "| model | prefill ms | decode ms/token | decode tokens/s | x ORT int4 | x ORT fp32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['vs_ort_int4']:.2f} | {r['vs_ort_fp32']:.2f} |"
        )
    cached, plain = by[f"ours {ref_bits}-bit"], by[f"ours {ref_bits}-bit, no KV cache"]
    lines += [
        "",
        f"KV cache: ours {ref_bits}-bit decodes {plain['decode_ms'] / cached['decode_ms']:.1f}x faster with "
        f"it than rerunning the sequence (at {a.prompt}+ tokens of context)",
        "",
        f"Fresh process, ours {ref_bits}-bit, 16-token prompt + 16 new tokens (median of {a.runner_reps}; "
        f"same ids: {proc[0]['same_ids']})\n",
        "| process | start-up (load) s | prefill ms | decode ms/token | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in proc:
        lines.append(
            f"| {p['process']} | {p['load_s']:.3f} | {p['prefill_ms']:.1f} | {p['decode_ms_per_token']:.2f} | "
            f"{p['peak_rss_mb']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    out = write_report(a.out, "e2e", text, {"generation": rows, "process": proc})
    with figure(out, "e2e", (7, 3.2)) as ax:
        ax.barh([r["model"] for r in rows], [r["tokens_per_s"] for r in rows])
        ax.set_xlabel(f"decode tokens/s after a {a.prompt}-token prompt (higher is better)")
    logger.info(f"wrote {out / 'e2e.md'}, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
