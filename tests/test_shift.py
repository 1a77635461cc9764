"""Shift weights (quant/shift.py): the codebook, nearest-level rounding against a brute-force numpy
search, the row scale's fit, and the error feedback's output error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shiftadd.quant.shift import ShiftWeight, fit_shift, levels, nearest


def _codebook(bits: int) -> np.ndarray:
    lv = levels(bits)
    mags = 2.0 ** -np.arange(lv)
    return np.concatenate([[0.0], mags, -mags])


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 6), n=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_nearest_is_the_closest_level(bits, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n * 7) * 2.0 ** rng.integers(-8, 2, n * 7)
    x[::5] = 0.0
    code = nearest(torch.from_numpy(x), levels(bits)).numpy().astype(np.int32)
    got = ShiftWeight(code[None], np.ones(1, np.float32)).dequantize()[0]
    book = _codebook(bits)
    best = np.abs(x[:, None] - book[None]).min(1)
    np.testing.assert_allclose(np.abs(x - got), best, rtol=1e-6, atol=1e-12)  # no level is closer


def test_values_are_signed_powers_of_two_of_the_row_scale():
    w = np.random.default_rng(0).standard_normal((5, 33)).astype(np.float32)
    sw = fit_shift(w, bits=4)
    r = sw.dequantize() / sw.scale[:, None]
    nz = r != 0
    np.testing.assert_array_equal(np.log2(np.abs(r[nz])), np.round(np.log2(np.abs(r[nz]))))
    assert np.log2(np.abs(r[nz])).min() >= -(levels(4) - 1) and np.abs(r).max() <= 1
    assert sw.codes.dtype == np.int8 and np.abs(sw.codes).max() <= levels(4)


def test_fitted_scale_beats_naive_power_of_two_rounding():
    w = (np.random.default_rng(1).standard_normal((64, 96)) * 0.05).astype(np.float32)
    naive = np.sign(w) * 2.0 ** np.round(np.log2(np.abs(w)))  # what a shift linear does without fitting
    err = lambda q: np.linalg.norm(w - q) / np.linalg.norm(w)  # noqa: E731
    ours = err(fit_shift(w, bits=4).dequantize())
    assert ours < 0.9 * err(naive), (ours, err(naive))
    top = np.abs(w).max(1, keepdims=True)  # the scale grid's first candidate: the row's maximum
    at_max = ShiftWeight(nearest(torch.from_numpy(w / top), levels(4)).numpy(), top[:, 0]).dequantize()
    assert ours <= err(at_max) + 1e-7


def test_error_feedback_lowers_the_output_error():
    rng = np.random.default_rng(2)
    k, n, samples = 48, 40, 512
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)  # correlated inputs: where feedback pays
    x = rng.standard_normal((samples, k)) @ mix
    w = rng.standard_normal((n, k)).astype(np.float32)
    h = x.T @ x / samples
    out = lambda q: np.linalg.norm(x @ (w - q).T)  # noqa: E731
    plain = out(fit_shift(w, bits=3).dequantize())
    fed = out(fit_shift(w, bits=3, hessian=h, damp=0.01).dequantize())
    assert fed < 0.8 * plain, (fed, plain)


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match="bits must be 2..8"):
        fit_shift(np.ones((2, 4)), bits=1)
    with pytest.raises(ValueError, match="2-d"):
        fit_shift(np.ones(4))
    with pytest.raises(ValueError, match="hessian must be"):
        fit_shift(np.ones((2, 4)), hessian=np.eye(3))
