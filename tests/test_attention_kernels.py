"""The values and softmax kernels over the cache equal numpy over odd shapes and every knob; the
three attention passes keep whole models' outputs equal."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


@functools.lru_cache(maxsize=None)
def _compiled(spec, knob):
    import tvm

    from shiftadd.schedules.attention_cpu import kernel
    from shiftadd.schedules.targets import resolve_target

    return tvm.compile(tvm.IRModule({"main": kernel(spec, knob)}), target=resolve_target("cpu"))["main"]


def _tol(dtype, n):
    return 1e-5 * np.sqrt(n) if dtype == "float32" else 2e-2 * np.sqrt(n)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    m=st.integers(1, 9),
    n=st.integers(1, 70),
    hd=st.sampled_from([(1, 1), (3, 64), (2, 18), (4, 3), (1, 80), (2, 8), (1, 32)]),
    pick=st.integers(0, 2),
    dtype=st.sampled_from(["float32", "float16"]),
    spare=st.sampled_from([0, 0, 1, 13]),
    seed=st.integers(0, 2**16),
)
def test_values_kernel_equals_numpy(b, m, n, hd, pick, dtype, spare, seed):
    """Against numpy; ``spare`` value rows past N (a preallocated cache's unused rows, garbage) are
    never read."""
    import tvm

    from shiftadd.schedules.attention_cpu import AttentionKernel, candidates

    heads, d = hd
    spec = AttentionKernel("values", heads, d, dtype)
    knobs = candidates(spec)
    rng = np.random.default_rng(seed)
    p = rng.random((b, heads, m, n)).astype(dtype)
    v = rng.standard_normal((b, heads, n + spare, d)).astype(dtype)
    v[:, :, n:] = np.nan
    out = tvm.runtime.empty((b, heads, m, d), dtype)
    _compiled(spec, knobs[pick % len(knobs)])(tvm.runtime.tensor(p), tvm.runtime.tensor(v), out)
    want = p.astype(np.float64) @ v[:, :, :n].astype(np.float64)
    np.testing.assert_allclose(out.numpy().astype(np.float64), want, rtol=_tol(dtype, n), atol=_tol(dtype, n))


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    heads=st.sampled_from([1, 3, 4, 9]),
    m=st.integers(1, 5),
    n=st.integers(1, 70),
    bias=st.sampled_from(["", "111", "x11", "x1x", "xxx", "1x1"]),
    rows=st.sampled_from([0, 1, 2, 3, 8]),
    dtype=st.sampled_from(["float32", "float16"]),
    masked=st.floats(0, 0.9),
    seed=st.integers(0, 2**16),
)
def test_softmax_kernel_equals_numpy(b, heads, m, n, bias, rows, dtype, masked, seed):
    import tvm

    from shiftadd.schedules.attention_cpu import AttentionKernel

    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal((b, heads, m, n))).astype(dtype)
    args = [x]
    z = x.astype(np.float64)
    if bias:  # a causal-style mask: a large negative value where masked, never the whole row
        shape = tuple(1 if f == "1" else e for f, e in zip(bias, (b, heads, m))) + (n,)
        mask = np.where(rng.random(shape) < masked, np.finfo(dtype).min, 0).astype(dtype)
        mask[..., 0] = 0
        args.append(mask)
        z = (x + mask).astype(np.float64)  # the add in the input dtype, as the graph's add computes it
    z = np.exp(z - z.max(-1, keepdims=True))
    want = z / z.sum(-1, keepdims=True)
    out = tvm.runtime.empty(x.shape, dtype)
    _compiled(AttentionKernel("softmax", heads, 0, dtype, bias), rows)(*map(tvm.runtime.tensor, args), out)
    tol = 1e-6 if dtype == "float32" else 1e-3
    np.testing.assert_allclose(out.numpy().astype(np.float64), want, rtol=tol * 10, atol=tol)


def test_kernels_reject_bad_geometry():
    from shiftadd.schedules.attention_cpu import AttentionKernel, kernel, softmax_kernel, values_kernel

    with pytest.raises(ValueError, match="cols divide d"):
        values_kernel(2, 18, cols=8)
    with pytest.raises(ValueError, match="bias '' or 3 of"):
        softmax_kernel(2, bias="1x")
    with pytest.raises(ValueError, match="kind 'gemm'"):
        kernel(AttentionKernel("gemm", 1, 1, "float32"))


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_attention_passes_keep_outputs(family, tmp_path):
    """scores_from_cache, values_from_cache and softmax_with_mask, in relax_passes.pipeline.lower's order,
    leave prefill (with a left-padded row: masked keys) and decode_one outputs equal, remove the
    key transposes and every softmax, and fold Llama's mask add into the softmax kernel."""
    from shiftadd.relax_passes.scores_from_cache import scores_from_cache
    from shiftadd.relax_passes.share_kv_heads import share_kv_heads
    from shiftadd.relax_passes.softmax_with_mask import softmax_with_mask
    from shiftadd.relax_passes.values_from_cache import values_from_cache

    from .test_share_kv_heads import _feeds, _imported, _run

    mod, params = _imported(family, tmp_path)
    src, _ = share_kv_heads(mod)  # as relax_passes.pipeline.lower runs it; llama: GQA, 2 layers
    new, nk, kspecs = scores_from_cache(src)
    new, nv, vspecs = values_from_cache(new)
    new, ns, sspecs = softmax_with_mask(new)
    assert nk == nv == ns == 3 * 2  # main, decode, decode_one x 2 layers (every attention's N is symbolic)
    assert [{s.kind for s in x} for x in (kspecs, vspecs, sspecs)] == [{"scores"}, {"values"}, {"softmax"}]
    for fname in ("main", "decode_one"):
        text = new[fname].script()
        assert all(f"shiftadd_{k}_" in text for k in ("scores", "values", "softmax")) and "R.nn.softmax" not in text
        assert text.count("R.permute_dims") < src[fname].script().count("R.permute_dims")
    if family == "llama":  # the mask's add is folded into the kernel: [1, 1, 1, N] onto [1, heads, 1, N]
        assert any(s.bias == "111" for s in sspecs)
    prefill, one = _feeds(mod, prefill_mask=[[1] * 6, [0, 0, 1, 1, 1, 1]])
    for fname, feeds in (("main", prefill), ("decode_one", one)):
        want = _run(mod, params, fname, feeds, scores=False)
        got = _run(new, params, fname, feeds, scores=False)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
