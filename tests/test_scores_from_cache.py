"""Attention scores read from the cache layout: the kernel equals numpy over odd shapes, and the
pass leaves every model output equal while removing the key transposes."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .test_share_kv_heads import _imported, _run


@functools.lru_cache(maxsize=None)
def _compiled(heads: int, d: int, dtype: str, block: int):
    import tvm

    from shiftadd.schedules.attention_cpu import scores_kernel
    from shiftadd.targets import resolve_target

    return tvm.compile(tvm.IRModule({"main": scores_kernel(heads, d, dtype, block)}), target=resolve_target("cpu"))


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), m=st.integers(1, 9), n=st.integers(1, 70),
       hd=st.sampled_from([(1, 1), (3, 64), (2, 18), (4, 3), (1, 80), (2, 8)]), block=st.sampled_from([1, 16, 7]),
       dtype=st.sampled_from(["float32", "float16"]), seed=st.integers(0, 2**16))
def test_scores_kernel_equals_numpy(b, m, n, hd, block, dtype, seed):
    import tvm

    heads, d = hd
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, heads, m, d)).astype(dtype)
    k = rng.standard_normal((b, heads, n, d)).astype(dtype)
    out = tvm.runtime.empty((b, heads, m, n), dtype)
    _compiled(heads, d, dtype, block)["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(k), out)
    want = q.astype(np.float64) @ k.astype(np.float64).transpose(0, 1, 3, 2)
    tol = 1e-4 if dtype == "float32" else 2e-2 * np.sqrt(d)
    np.testing.assert_allclose(out.numpy().astype(np.float64), want, rtol=tol, atol=tol)


def test_scores_kernel_rejects_bad_geometry():
    from shiftadd.schedules.attention_cpu import scores_kernel

    with pytest.raises(ValueError, match="heads, d and block must be positive"):
        scores_kernel(0, 64)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_scores_pass_keeps_outputs_and_drops_key_transposes(family, tmp_path):
    from shiftadd.relax_passes.scores_from_cache import scores_from_cache
    from shiftadd.relax_passes.share_kv_heads import share_kv_heads

    from .conftest import VOCAB

    mod, params = _imported(family, tmp_path)
    src, _ = share_kv_heads(mod)  # as float_tuning.lower runs it; llama: GQA, 2 layers
    new, n, _ = scores_from_cache(src)
    assert n == 3 * 2  # main, decode, decode_one x 2 layers
    for fname in ("main", "decode_one"):
        assert "shiftadd_scores_" in new[fname].script()
        assert new[fname].script().count("R.permute_dims") < src[fname].script().count("R.permute_dims")
    rng = np.random.default_rng(1)
    prefill = {"input_ids": rng.integers(0, VOCAB, (2, 6)).astype(np.int64), "attention_mask": np.ones((2, 6), np.int64)}
    one = {"input_ids": rng.integers(0, VOCAB, (1, 1)).astype(np.int64), "attention_mask": np.ones((1, 6), np.int64)}
    for p in mod["decode_one"].params[:int(mod["decode_one"].attrs["num_input"])]:
        if p.name.startswith("past_key_values"):
            one[p.name] = rng.standard_normal([int(s) if i != 2 else 5 for i, s in enumerate(
                [1, *p.ty.shape.values[1:]])]).astype(np.float32)
    for fname, feeds in (("main", prefill), ("decode_one", one)):
        want = _run(mod, params, fname, feeds, scores=False)
        got = _run(new, params, fname, feeds, scores=False)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
