"""``compile(cluster=...)``: the error-feedback fits on a Ray cluster (a local one started here, two
workers) write the artifact a local compile writes, byte for byte; bad addresses fail in seconds,
before the model is read."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import shiftadd
from shiftadd.quant import executors

from .conftest import VOCAB, free_port


def _ray(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, **kw)


@pytest.fixture(scope="module")
def ray_address():
    """A local two-CPU Ray cluster with its client server: its ``ray://`` address."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # raylet socket paths must stay short
    client = free_port()
    started = _ray(
        "start",
        "--head",
        f"--port={free_port()}",
        f"--ray-client-server-port={client}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={tmp}",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield f"ray://127.0.0.1:{client}"
    finally:
        ray.shutdown()
        _ray("stop", "--force", capture_output=True, timeout=120)


def test_cluster_values_are_checked():
    assert isinstance(executors.executor_for(None), executors.LocalExecutor)
    for bad in ("", "  ", 5):
        with pytest.raises(ValueError, match="expected ray://HOST:PORT"):
            executors.executor_for(bad)


def test_unreachable_cluster_fails_before_the_model_is_read(tmp_path):
    t = time.time()
    with pytest.raises(ValueError, match=r"cluster '127\.0\.0\.1:1': cannot connect"):
        shiftadd.compile(str(tmp_path / "never-read.onnx"), tmp_path / "x.so", "q2", cluster="127.0.0.1:1")
    assert time.time() - t < 120 and not (tmp_path / "x.so").exists()


def test_fits_on_a_ray_cluster_write_the_local_artifact(tiny_onnx, tmp_path, ray_address):
    """The tiny Llama ONNX file calibrated on 16 sequences at 2 bits: the params file written with the
    fits on two Ray workers equals the local compile's byte for byte (and so do its logits)."""
    onnx_path = tiny_onnx("llama")
    ids = np.random.default_rng(3).integers(0, VOCAB, (16, 16)).astype(np.int64)
    data = tmp_path / "calib.npz"
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids))
    local = shiftadd.compile(onnx_path, tmp_path / "local.so", "q2", group=36, calibration_data=data)
    remote = shiftadd.compile(
        onnx_path, tmp_path / "ray.so", "q2", group=36, calibration_data=data, cluster=ray_address
    )
    assert remote.manifest["calibration"]["fits_on"] == "ray" and local.manifest["calibration"]["fits_on"] == "local"
    a, b = (tmp_path / "local.params").read_bytes(), (tmp_path / "ray.params").read_bytes()
    assert len(a) == len(b) and a == b
    feed = {"input_ids": ids[:2], "attention_mask": np.ones_like(ids[:2])}
    np.testing.assert_array_equal(
        shiftadd.load(local.so).run(["logits"], feed)[0], shiftadd.load(remote.so).run(["logits"], feed)[0]
    )
