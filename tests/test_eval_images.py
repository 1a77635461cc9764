"""``shiftadd eval --images``: a compiled vision model's fidelity to ONNX Runtime fp32 on the packaged
photographs, its measures checked against numpy's own definitions and against a run of both models
made here."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from shiftadd.eval.images import fidelity, image_sets, per_image

from .test_encoders import _export


def test_measures_equal_their_numpy_definitions():
    rng = np.random.default_rng(0)
    ref = rng.random((4, 6, 7))
    out = ref + 0.3 * rng.standard_normal(ref.shape)
    out[2] = -ref[2]  # anti-correlated: correlation -1, cosine -1 (all of ref is positive)
    m = per_image(out, ref)
    a, b = out.reshape(4, -1), ref.reshape(4, -1)
    np.testing.assert_allclose(m["corr"], [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)], rtol=1e-12)
    cos = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)]
    np.testing.assert_allclose(m["cosine"], cos, rtol=1e-12)
    assert m["corr"][2] == pytest.approx(-1) and m["cosine"][2] == pytest.approx(-1)
    for i, (x, y) in enumerate(zip(a, b)):  # top region: the elements above 0.8 x the maximum
        top_x, top_y = set(np.flatnonzero(x > 0.8 * x.max())), set(np.flatnonzero(y > 0.8 * y.max()))
        assert m["iou"][i] == pytest.approx(len(top_x & top_y) / len(top_x | top_y))
    f = fidelity(out, ref)
    assert f["corr_worst"] == pytest.approx(-1) and f["iou_mean"] == pytest.approx(m["iou"].mean())


def test_eval_images_of_a_4_bit_vit_equals_both_models_run_here(tmp_path):
    import onnxruntime as ort

    import shiftadd
    from shiftadd.eval.images import eval_images

    try:
        _, evals, names = image_sets((32, 32))
    except FileNotFoundError as e:
        pytest.skip(str(e))
    vit = _export("vit", tmp_path / "vit.onnx")
    so = shiftadd.compile(vit, tmp_path / "vit.so", group=32).so  # the default 4-bit LUT-add, groups of 32
    row = eval_images(str(so), out=str(tmp_path / "res"))
    assert row["images"] == len(evals) == 8 * (len(names) - -(-len(names) // 4))  # the views of 3 in 4 photos

    sess = shiftadd.load(so)
    ref = ort.InferenceSession(vit, providers=["CPUExecutionProvider"])
    ours = np.concatenate([sess.run(None, {"pixel_values": evals[i : i + 8]})[0] for i in range(0, len(evals), 8)])
    want = np.concatenate([ref.run(None, {"pixel_values": evals[i : i + 8]})[0] for i in range(0, len(evals), 8)])
    corr = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(ours.astype(np.float64), want.astype(np.float64))]
    np.testing.assert_allclose(row["per_image"]["corr"], corr, rtol=1e-9)
    assert 0.9 < row["corr_worst"] <= row["corr_mean"] < 1  # 4 bits move a random ViT's outputs a little
    saved = json.loads((tmp_path / "res" / "images.json").read_text())
    assert [r["corr_mean"] for r in saved] == [row["corr_mean"]] and (tmp_path / "res" / "images.png").stat().st_size

    cli = [sys.executable, "-m", "shiftadd.cli", "eval", str(so)]
    done = subprocess.run([*cli, "--images", "--out", str(tmp_path / "res")], capture_output=True, text=True)
    assert done.returncode == 0 and f"correlation {row['corr_mean']:.4f}" in done.stdout, done.stderr[-2000:]
    wrong = subprocess.run(cli, capture_output=True, text=True)  # perplexity asked of an image model
    assert wrong.returncode != 0 and "takes images" in wrong.stderr and "--images" in wrong.stderr, wrong.stderr[-2000:]
