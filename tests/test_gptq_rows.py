"""The batched row-group fit (quant/gptq_rows.py): stacking and joining change nothing, its free
error bookkeeping is the output error, and it is at least as good as the per-matrix loop."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shiftadd.quant import BCQConfig
from shiftadd.quant.gptq import quantize_matrix_gptq
from shiftadd.quant.gptq_rows import _loop, _unit, fit_rows, prepare
from shiftadd.quant.refit import row_errors

from .test_gptq import _correlated


def _hessian(k, seed):
    x = _correlated(k, 4 * k, seed)
    return x @ x.T / x.shape[1]


def _output_error(w, bw, h):
    d = np.asarray(w, np.float64) - bw.dequantize().astype(np.float64)
    return np.einsum("nk,kl,nl->n", d, h, d)


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(4, 90),
    bits=st.sampled_from([2, 3, 4]),
    group=st.sampled_from([8, 12, 32]),
    tied=st.booleans(),
    offset=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_loop_error_is_the_output_error(n, k, bits, group, tied, offset, seed):
    """Σ err² of the loop equals (w - ŵ)ᵀ H (w - ŵ) per row (odd shapes: ragged last group, one row),
    and its codes are the nearest codewords of their column's codebook for the error-updated column
    (here: no worse than the per-matrix reference loop on the same static codebook)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    h = _hessian(k, seed)
    cfg = BCQConfig(bits=bits, group=group, tied=tied, offset=offset, refits=0)
    W, H = prepare(w, h, 0.01)
    unit = _unit([w], h, cfg, 0.01)
    base = unit.base
    zoff = torch.from_numpy(base.offset)[None] if offset else torch.zeros((1,) + base.alpha.shape[1:])
    j, err = _loop([unit], torch.from_numpy(base.alpha)[None], zoff, base.group, bits, tied)
    (got,) = fit_rows([(w, h)], cfg)
    exact = row_errors(W, torch.from_numpy(got.dequantize()), H).numpy()
    np.testing.assert_allclose(err[0].numpy(), exact, rtol=2e-3, atol=1e-6 * (exact.max() + 1e-12))
    ref = quantize_matrix_gptq(w, h, cfg)  # the per-matrix loop, float64
    e_ref = row_errors(W, torch.from_numpy(ref.dequantize()), H).numpy()
    assert exact.sum() <= e_ref.sum() * 1.01 + 1e-9


def test_stacked_and_joined_fits_equal_separate_fits():
    """Three matrices on one Hessian (joined by rows) and three same-shape matrices on others
    (stacked): each result equals that matrix fitted alone, and refits never raise a row's error."""
    rng = np.random.default_rng(0)
    k = 72
    shared = _hessian(k, 1)
    jobs = [(rng.standard_normal((n, k)).astype(np.float32), shared) for n in (24, 8, 8)]
    jobs += [(rng.standard_normal((16, k)).astype(np.float32), _hessian(k, s)) for s in (2, 3, 4)]
    jobs.append((rng.standard_normal((16, k)).astype(np.float32), shared.copy()))  # equal values: joined too
    cfg = BCQConfig(bits=3, group=24, scale_format="e5m2", tied=True, refits=3)
    together = fit_rows(jobs, cfg)
    for (w, h), bw in zip(jobs, together, strict=True):
        (alone,) = fit_rows([(w, h)], cfg)
        e_t, e_a = _output_error(w, bw, h), _output_error(w, alone, h)
        np.testing.assert_allclose(e_t, e_a, rtol=1e-4)
        assert (bw.signs == alone.signs).mean() > 0.999
        no_refit = fit_rows([(w, h)], BCQConfig(**{**cfg.__dict__, "refits": 0}))[0]
        hd = prepare(w, h, 0.01)[1].numpy()  # the objective the fit keeps the better of: dampened H
        assert (_output_error(w, alone, hd) <= _output_error(w, no_refit, hd) * (1 + 1e-6) + 1e-12).all()


def test_fit_rows_rejects_other_layouts_and_bad_hessians():
    import pytest

    w = np.ones((4, 16), np.float32)
    with pytest.raises(ValueError, match="row-group"):
        fit_rows([(w, np.eye(16))], BCQConfig(bits=3, layout="block"))
    with pytest.raises(ValueError, match=r"hessian must be \[16, 16\]"):
        fit_rows([(w, np.eye(15))], BCQConfig(bits=3, group=8))
    with pytest.raises(ValueError, match="NaN"):
        fit_rows([(w, np.full((16, 16), np.nan))], BCQConfig(bits=3, group=8))
