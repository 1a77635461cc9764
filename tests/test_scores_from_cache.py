"""Attention scores read from the cache layout: the kernel equals numpy over odd shapes (the pass,
with the other two attention passes, is tested on whole models in test_attention_kernels.py)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


@functools.lru_cache(maxsize=None)
def _compiled(heads: int, d: int, dtype: str, block: int):
    import tvm

    from shiftadd.schedules.attention_cpu import scores_kernel
    from shiftadd.schedules.targets import resolve_target

    return tvm.compile(tvm.IRModule({"main": scores_kernel(heads, d, dtype, block)}), target=resolve_target("cpu"))


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    m=st.integers(1, 9),
    n=st.integers(1, 70),
    hd=st.sampled_from([(1, 1), (3, 64), (2, 18), (4, 3), (1, 80), (2, 8)]),
    block=st.sampled_from([1, 16, 7]),
    dtype=st.sampled_from(["float32", "float16"]),
    spare=st.sampled_from([0, 0, 1, 13]),
    seed=st.integers(0, 2**16),
)
def test_scores_kernel_equals_numpy(b, m, n, hd, block, dtype, spare, seed):
    """Against numpy; ``spare`` rows of the key tensor past N (a preallocated cache's unused rows,
    filled with garbage) are never read."""
    import tvm

    heads, d = hd
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, heads, m, d)).astype(dtype)
    k = rng.standard_normal((b, heads, n + spare, d)).astype(dtype)
    k[:, :, n:] = np.nan
    out = tvm.runtime.empty((b, heads, m, n), dtype)
    _compiled(heads, d, dtype, block)["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(k), out)
    want = q.astype(np.float64) @ k[:, :, :n].astype(np.float64).transpose(0, 1, 3, 2)
    tol = 1e-4 if dtype == "float32" else 2e-2 * np.sqrt(d)
    np.testing.assert_allclose(out.numpy().astype(np.float64), want, rtol=tol, atol=tol)


def test_scores_kernel_rejects_bad_geometry():
    from shiftadd.schedules.attention_cpu import scores_kernel

    with pytest.raises(ValueError, match="heads, d and block must be positive"):
        scores_kernel(0, 64)
