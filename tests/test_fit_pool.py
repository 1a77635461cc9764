"""Layer fits in worker processes equal the serial fits exactly, and both fit the output better than
plain rounding (an independent numpy check of what was fitted)."""

from __future__ import annotations

import numpy as np
import pytest


def _jobs():
    from shiftadd.quant.bcq import BCQConfig

    rng = np.random.default_rng(0)
    jobs = []
    for i, (n, k, bits, tied) in enumerate(
        [(24, 64, 4, True), (40, 96, 3, False), (9, 32, 2, False), (33, 64, 4, False)]
    ):
        x = rng.standard_normal((256, k)) * rng.gamma(1.0, 1.0, k)  # uneven input scales: feedback matters
        h = x.T @ x / len(x)
        w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
        cfg = BCQConfig(bits=bits, group=32, scale_format="e5m2", tied=tied, refits=1)
        jobs.append((f"layer{i}", w, cfg, h))
    return jobs


def test_workers_equal_the_serial_loop():
    from shiftadd.quant.fit_pool import fit_layers

    jobs = _jobs()
    serial = fit_layers(jobs, workers=1)
    pooled = fit_layers(jobs, workers=2)
    assert sorted(serial) == sorted(pooled) == sorted(j[0] for j in jobs)
    for name in serial:
        a, b = serial[name], pooled[name]
        np.testing.assert_array_equal(a.signs, b.signs)
        np.testing.assert_array_equal(a.alpha, b.alpha)
        np.testing.assert_array_equal(a.offset, b.offset)
    for name, w, cfg, h in jobs:  # the output error (w - ŵ) H (w - ŵ)ᵀ beats per-weight rounding
        d = w.astype(np.float64) - serial[name].dequantize()
        step = (w.max(1, keepdims=True) - w.min(1, keepdims=True)) / (2**cfg.bits - 1)
        rtn = w.min(1, keepdims=True) + np.round((w - w.min(1, keepdims=True)) / step) * step
        r = w.astype(np.float64) - rtn
        assert np.einsum("nk,kl,nl->", d, h, d) < np.einsum("nk,kl,nl->", r, h, r), name


def test_bad_worker_count():
    from shiftadd.quant.fit_pool import fit_layers

    with pytest.raises(ValueError, match="workers"):
        fit_layers(_jobs(), workers=0)
