"""Calibration on user arrays (``--calibration-data FILE.npz``): clear errors for bad files, and an
ONNX model calibrated on them fits its outputs better than weight-only, against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import shiftadd
from shiftadd.calibration.arrays import array_batches

from .conftest import VOCAB

SPECS = [
    {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
    {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]},
]


def _ids(samples: int, seq: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (samples, seq)).astype(np.int64)


def test_feeds_split_samples(tmp_path):
    ids = _ids(5)
    path = tmp_path / "c.npz"
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids))
    feeds = array_batches(path, SPECS, batch=2)
    assert len(feeds) == 2 and all(f["input_ids"].shape == (2, 12) for f in feeds)
    np.testing.assert_array_equal(np.concatenate([f["input_ids"] for f in feeds]), ids[:4])
    static = [dict(SPECS[0], shape=["1", "seq"]), dict(SPECS[1], shape=["1", "seq"])]
    assert len(array_batches(path, static, batch=4)) == 5  # a static batch of 1 wins


@pytest.mark.parametrize(
    "arrays, suffix, message",
    [
        ({"input_ids": _ids(2)}, ".npz", "missing ['attention_mask']"),
        ({"input_ids": _ids(2), "attention_mask": _ids(2), "pixels": _ids(2)}, ".npz", "unknown ['pixels']"),
        ({"input_ids": _ids(2).astype(np.int32), "attention_mask": _ids(2)}, ".npz", "is int32, the model takes int64"),
        ({"input_ids": _ids(2)[0], "attention_mask": _ids(2)}, ".npz", "samples stacked along the first axis"),
        ({"input_ids": _ids(2), "attention_mask": _ids(3)}, ".npz", "different sample counts"),
        ({"input_ids": _ids(2)}, ".npy", "expected a .npz file"),
    ],
)
def test_bad_files_are_named(arrays, suffix, message, tmp_path):
    path = tmp_path / f"c{suffix}"
    if suffix == ".npz":
        np.savez(path, **arrays)
    else:
        np.save(path, arrays["input_ids"])
    with pytest.raises(ValueError, match=str(path)) as e:
        array_batches(path, SPECS)
    assert message in str(e.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        array_batches(tmp_path / "none.npz", SPECS)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot be read as .npz"):
        array_batches(bad, SPECS)
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.array([[np.nan, 1.0]], np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        array_batches(nan, [{"name": "x", "dtype": "float32", "shape": ["b", "2"]}])


@pytest.mark.parametrize(
    "quant, overrides, message",
    [("none", {}, "rewrites no weight"), ("q2", {"windows": 8}, "both set"), ("q2", {}, "no such file")],
)
def test_calibration_data_the_options_would_ignore_is_an_error(quant, overrides, message, tmp_path):
    """Refused before the model is read: no silently unused file, no silently overridden option."""
    data = tmp_path / "calib.npz"
    if message != "no such file":
        np.savez(data, input_ids=_ids(2), attention_mask=np.ones_like(_ids(2)))
    with pytest.raises(ValueError, match=message):
        shiftadd.compile(str(tmp_path / "none.onnx"), tmp_path / "x.so", quant, calibration_data=data, **overrides)
    assert not (tmp_path / "x.so").exists()


def test_onnx_model_calibrated_on_arrays_fits_better_than_weight_only(tiny_onnx, tmp_path):
    """The tiny Llama ONNX file at 2 bits: fitted with error feedback on 16 calibration sequences its
    logits on those sequences are closer to ONNX Runtime fp32's than the weight-only fit's."""
    onnx_path = tiny_onnx("llama")
    ids = _ids(16, seq=16, seed=1)
    data = tmp_path / "calib.npz"
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids))
    cal = shiftadd.compile(onnx_path, tmp_path / "cal.so", "q2", group=36, calibration_data=data)
    assert cal.manifest["calibration"]["arrays"] == "calib.npz" and cal.manifest["calibration"]["windows"] == 16
    plain = shiftadd.compile(onnx_path, tmp_path / "plain.so", "q2", group=36)
    assert plain.manifest["calibration"] is None
    ref_sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    ref = ref_sess.run(["logits"], feed)[0]
    err = {}
    for name, res in (("calibrated", cal), ("weight-only", plain)):
        got = shiftadd.load(res.so).run(["logits"], feed)[0]
        err[name] = float(np.mean((got - ref) ** 2))
    assert err["calibrated"] < err["weight-only"], err
