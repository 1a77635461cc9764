"""GQA attention without per-head copies of K/V: the rewrite keeps every output equal and removes
the broadcasts; models without grouped heads are left alone."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import VOCAB, _tiny


def _imported(family, tmp_path):
    from shiftadd.frontend import export_onnx_with_cache, import_onnx, merge_functions
    from shiftadd.relax_passes.specialize_decode import add_decode_one

    ex = export_onnx_with_cache(_tiny(family), tmp_path)
    base, dec = import_onnx(ex.prefill), import_onnx(ex.decode)
    return add_decode_one(merge_functions(base, {"decode": dec})), base.params


def _run(mod, params, fname, feeds, scores: bool = True):
    import tvm
    from tvm import relax

    from shiftadd.relax_passes.pipeline import build
    from shiftadd.schedules.targets import resolve_target

    vm = relax.VirtualMachine(build(mod, resolve_target("cpu"), share_kv=False, attention=scores), tvm.cpu())
    func = mod[fname]
    n_in = int(func.attrs["num_input"])
    args = [tvm.runtime.tensor(feeds[p.name]) for p in func.params[:n_in]]
    args += [tvm.runtime.tensor(params[p.name]) for p in func.params[n_in:]]
    out = vm[fname](*args)
    return [o.numpy() for o in out] if not hasattr(out, "numpy") else [out.numpy()]


def assert_prefill_equals_onnxruntime(mod, params, onnx_path, atol: float = 1e-4) -> None:
    """``mod``'s ``main`` (built by our pipeline) on a random 2 x 7 batch equals ONNX Runtime on the
    exported file, every output."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (2, 7)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got = _run(mod, params, "main", feeds)
    want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=atol)


def _feeds(mod, seed: int = 1, past: int = 5, prefill_mask=None):
    """(prefill feeds for ``main``: 2 x 6 tokens, decode_one feeds: 1 token over ``past`` random cached
    positions) for a model of tests/conftest (its vocabulary)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((2, 6), np.int64) if prefill_mask is None else np.asarray(prefill_mask, np.int64)
    prefill = {"input_ids": rng.integers(0, VOCAB, (2, 6)).astype(np.int64), "attention_mask": mask}
    one = {
        "input_ids": rng.integers(0, VOCAB, (1, 1)).astype(np.int64),
        "attention_mask": np.ones((1, past + 1), np.int64),
    }
    for p in mod["decode_one"].params[: int(mod["decode_one"].attrs["num_input"])]:
        if p.name.startswith("past_key_values"):
            one[p.name] = rng.standard_normal(
                [int(s) if i != 2 else past for i, s in enumerate([1, *p.ty.shape.values[1:]])]
            ).astype(np.float32)
    return prefill, one


def test_gqa_matmuls_read_the_cache_once_and_agree(tmp_path):
    from shiftadd.relax_passes.share_kv_heads import share_kv_heads

    mod, params = _imported("llama", tmp_path)  # 4 query heads over 2 key/value heads
    new, n = share_kv_heads(mod)
    assert n == 3 * 2 * 2  # main, decode, decode_one x 2 layers x (scores, values)
    for fname in ("main", "decode_one"):
        assert new[fname].script().count("R.broadcast_to") < mod[fname].script().count("R.broadcast_to")
    prefill, one = _feeds(mod, seed=0)
    for fname, feeds in (("main", prefill), ("decode_one", one)):
        want = _run(mod, params, fname, feeds)
        got = _run(new, params, fname, feeds)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_models_without_grouped_heads_are_unchanged(family, tmp_path):
    from shiftadd.relax_passes.share_kv_heads import share_kv_heads

    mod, _ = _imported(family, tmp_path)
    new, n = share_kv_heads(mod)
    import tvm_ffi

    assert n == 0 and tvm_ffi.structural_equal(new, mod)
