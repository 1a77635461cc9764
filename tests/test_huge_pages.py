"""Weights copied into a huge-page region: the same values, TVM's alignment, one region; a session
running from them gives the same outputs as from TVM's own allocation."""

from __future__ import annotations

import numpy as np
import tvm

from shiftadd.runtime import huge_pages
from shiftadd.runtime.huge_pages import ALIGN, HUGE_PAGE, in_huge_pages


def test_copies_are_equal_aligned_and_contiguous():
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.integers(0, 255, (7, 11, 13), dtype=np.uint8),
        "c": rng.standard_normal(1).astype(np.float16),
        "d": rng.integers(-9, 9, (17,), dtype=np.int64),
    }
    tensors = {n: tvm.runtime.tensor(a) for n, a in arrays.items()}
    out, region = in_huge_pages(tensors)
    if huge_pages._thp_mode() not in ("madvise", "always"):  # the documented fallback: untouched
        assert region is None and out is tensors
        return
    assert region is not None and set(out) == set(arrays)
    addrs = []
    for n, a in arrays.items():
        view = np.from_dlpack(out[n])
        np.testing.assert_array_equal(view, a)
        assert view.dtype == a.dtype and view.shape == a.shape
        addrs.append(view.ctypes.data)
    assert all(addr % ALIGN == 0 for addr in addrs)
    assert addrs[0] % HUGE_PAGE == 0 and addrs == sorted(addrs) and addrs[-1] - addrs[0] < HUGE_PAGE


def test_empty_and_unavailable(monkeypatch):
    assert in_huge_pages({}) == ({}, None)
    t = {"x": tvm.runtime.tensor(np.ones(4, np.float32))}
    monkeypatch.setattr(huge_pages, "_thp_mode", lambda: "never")
    out, region = in_huge_pages(t)
    assert out is t and region is None


def test_session_outputs_equal_with_and_without(tiny_onnx, tmp_path, monkeypatch):
    import shiftadd

    from .conftest import ragged_batch

    res = shiftadd.compile(tiny_onnx("llama"), tmp_path / "m.so", "q3", bits=3, group=36)
    ids, mask = ragged_batch()
    feed = {"input_ids": ids, "attention_mask": mask}
    with_region = shiftadd.load(res.so)
    got = with_region.run(["logits"], feed)[0]
    monkeypatch.setattr(huge_pages, "_thp_mode", lambda: "never")
    plain = shiftadd.load(res.so)
    assert plain._weight_region is None
    np.testing.assert_array_equal(got, plain.run(["logits"], feed)[0])
