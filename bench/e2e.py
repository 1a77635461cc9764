"""End-to-end speed (issue 4): SmolLM2-135M compiled by shiftadd at 2/3/4 bits against the same
model in ONNX Runtime fp32 and ONNX Runtime int4 (MatMulNBits, RTN block 128, accuracy_level 4),
every weight matmul low-bit in the quantized rows (lm_head included: it is the largest matmul).

Decode step = one forward of ONE token with no past (the artifacts have no KV cache yet: issue 5),
i.e. every weight streamed once plus every operator's launch: the per-token cost of decoding at a
short context. Prefill = one forward of --prefill tokens. Timing: blocks of calls per model,
alternated over many rounds (each runtime spins its own pool within a block, as it would in
service; the first call of a block is discarded so the previous block's pool has gone quiet),
medians reported. Our models use the tuning database's knobs where it has them.

    python bench/e2e.py [--bits 2 3 4] [--rounds 8] [--prefill 128]

Writes out/bench/e2e.{md,json,png}; compiled models are kept in --work and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

from shiftadd.util import atomic_path, log  # noqa: E402

THREADS = 2
TUNE = True  # compile --tune: kernels missing from the database are tuned first (same spin settings as here)


def source_onnx(work: Path) -> Path:
    from shiftadd.frontend import export_onnx, load_hf_model

    src = work / "smollm2.onnx"
    if not src.exists():
        model, _, _ = load_hf_model("smollm2")
        export_onnx(model, src)
    return src


def ort_int4(src: Path, work: Path) -> Path:
    """ONNX Runtime's own int4 quantizer (RTN, symmetric, block 128, int8 compute), every MatMul."""
    dst = work / "ort-int4-b128-acc4.onnx"
    if dst.exists():
        return dst
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    cfg = mq.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=4, bits=4)
    q = mq.MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=128, is_symmetric=True,
                                accuracy_level=4, algo_config=cfg)
    q.process()
    tmp = dst.with_suffix(".tmp.onnx")
    onnx.save(q.model.model if hasattr(q.model, "model") else q.model, str(tmp), save_as_external_data=False)
    tmp.replace(dst)
    return dst


def ours(src: Path, work: Path, bits: int) -> Path:
    import shiftadd

    so = work / f"ours-{bits}bit.so"
    if not so.exists():  # weight-only fit: this benchmark measures speed, docs/QUALITY.md measures quality
        shiftadd.compile(str(src), so, bits=bits, skip=(), calib_windows=0, tune=TUNE)
    return so


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def blocked(cands: dict, rounds: int, block: int) -> dict[str, np.ndarray]:
    """Seconds per call: ``rounds`` x (``block`` - 1) samples per candidate, blocks alternated."""
    times = {k: [] for k in cands}
    for r in range(rounds):
        for name in (list(cands) if r % 2 == 0 else list(cands)[::-1]):
            f = cands[name]
            for i in range(block):
                t0 = time.perf_counter()
                f()
                if i:
                    times[name].append(time.perf_counter() - t0)
    return {k: np.asarray(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=6, help="calls per block (the first is discarded)")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--work", default="out/e2e")
    ap.add_argument("--out", default="out/bench")
    a = ap.parse_args(argv)

    import shiftadd

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    src = source_onnx(work)
    models = {f"ours {b}-bit": ("ours", ours(src, work, b)) for b in a.bits}
    models["ORT fp32"] = ("ort", src)
    models["ORT int4 b128 acc4"] = ("ort", ort_int4(src, work))
    rng = np.random.default_rng(0)
    feeds = {"decode": np.array([[rng.integers(100, 40000)]], np.int64),
             "prefill": rng.integers(100, 40000, (1, a.prefill)).astype(np.int64)}
    rows = []
    for phase, ids in feeds.items():
        mask = np.ones_like(ids)
        cands = {}
        for name, (kind, path) in models.items():
            if kind == "ours":
                sess = shiftadd.load(path)
                cands[name] = (lambda s=sess: s.run(["logits"], {"input_ids": ids, "attention_mask": mask}))
            else:
                sess = ort_session(path)
                cands[name] = (lambda s=sess: s.run(["logits"], {"input_ids": ids, "attention_mask": mask}))
        log(f"{phase}: timing {len(cands)} models, {a.rounds} rounds x {a.block} calls")
        times = blocked(cands, a.rounds, a.block if phase == "decode" else max(3, a.block // 2))
        for name, t in times.items():
            rows.append({"phase": phase, "model": name, "tokens": int(ids.shape[1]), "ms": float(np.median(t) * 1e3),
                         "p90_ms": float(np.percentile(t, 90) * 1e3), "samples": len(t)})
    for name, (kind, path) in models.items():
        size = sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).stem + ".*")
                   if p.suffix in (".so", ".params")) if kind == "ours" else Path(path).stat().st_size
        for r in rows:
            if r["model"] == name:
                r["artifact_mb"] = size / 1e6
    dec = {r["model"]: r for r in rows if r["phase"] == "decode"}
    for r in rows:
        if r["phase"] == "decode":
            r["tokens_per_s"] = 1e3 / r["ms"]
            r["vs_ort_int4"] = dec["ORT int4 b128 acc4"]["ms"] / r["ms"]
            r["vs_ort_fp32"] = dec["ORT fp32"]["ms"] / r["ms"]
    lines = [f"SmolLM2-135M, {THREADS} threads; decode step = 1 token, no past (no KV cache yet); prefill = "
             f"{a.prefill} tokens\n",
             "| model | artifact MB | decode ms | decode tokens/s | x ORT int4 | x ORT fp32 | prefill ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in models:
        d = dec[name]
        p = [r for r in rows if r["phase"] == "prefill" and r["model"] == name][0]
        lines.append(f"| {name} | {d['artifact_mb']:.0f} | {d['ms']:.2f} | {d['tokens_per_s']:.1f} | "
                     f"{d['vs_ort_int4']:.2f} | {d['vs_ort_fp32']:.2f} | {p['ms']:.1f} |")
    if "ours 3-bit" in dec:
        d = dec["ours 3-bit"]
        lines += ["", f"Goal: 3-bit decode >= 1.5x ORT int4 ({d['vs_ort_int4']:.2f}x: "
                  f"{'met' if d['vs_ort_int4'] >= 1.5 else 'MISSED'}) and >= 4x ORT fp32 ({d['vs_ort_fp32']:.2f}x: "
                  f"{'met' if d['vs_ort_fp32'] >= 4 else 'MISSED'})"]
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    with atomic_path(out / "e2e.md") as tmp:
        tmp.write_text(f"`{' '.join(['python', *sys.argv])}`\n\n" + text + "\n")
    with atomic_path(out / "e2e.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(models)
    ax.barh(names, [dec[n]["tokens_per_s"] for n in names])
    ax.set_xlabel("decode steps / s (1 token, no past; higher is better)")
    fig.tight_layout()
    fig.savefig(out / "e2e.png", dpi=100)
    plt.close(fig)
    log(f"wrote {out / 'e2e.md'}, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
