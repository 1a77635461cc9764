"""Sibling LUT calls (Q/K/V, gate/up) stacked into one call: bit-identical outputs, fewer calls."""

from __future__ import annotations

import numpy as np
import pytest

from shiftadd.schedules import lut_avx2
from shiftadd.schedules.targets import resolve_target

from .conftest import tiny_config

pytestmark = pytest.mark.skipif(
    not lut_avx2.target_supported(resolve_target("cpu")), reason="the AVX2 kernel needs an AVX2/FMA/F16C host"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama whose projections are all multiples of 32 rows (q/o 64, k/v 32, gate/up 96)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    cfg = tiny_config("llama", hidden_size=64, intermediate_size=96)
    path = tmp_path_factory.mktemp("sib") / "llama"
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def _lut_calls(so) -> dict:
    import shiftadd

    sess = shiftadd.load(so)
    counts = {}

    def instrument(func, symbol, before, ret, *args):
        if before and str(symbol).startswith("shiftadd_lut8"):
            counts[str(symbol)] = counts.get(str(symbol), 0) + 1
        return 0

    sess._vm().set_instrument(instrument)
    return sess, counts


@pytest.mark.parametrize("bits, tied", [(2, False), (3, False), (4, True)])
def test_stacked_siblings_equal_separate_calls(folder, tmp_path, bits, tied):
    """Tied scales (one per row and group) stack the same way: their kernels are a family of their own."""
    import shiftadd

    kw = dict(bits=bits, group=32, windows=0, kernel="avx2", tied=tied)
    a = shiftadd.compile(str(folder), tmp_path / "sep.so", "q3", stack_siblings=False, **kw)
    b = shiftadd.compile(str(folder), tmp_path / "stk.so", "q3", **kw)
    sa, ca = _lut_calls(a.so)
    sb, cb = _lut_calls(b.so)
    rng = np.random.default_rng(bits)
    ids = rng.integers(0, 96, (2, 7)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    out_a, out_b = sa.run(None, feed), sb.run(None, feed)
    for x, y in zip(out_a, out_b):
        np.testing.assert_array_equal(x, y)  # same codes, same scales, same sums: bit-identical
    # per layer: q/k/v -> 1 call, gate/up -> 1 call (o and down stay): 7 -> 4
    assert sum(ca.values()) == 2 * 7 and sum(cb.values()) == 2 * 4
    assert any("_n128_" in s for s in cb) and any("_n192_" in s for s in cb)  # 64+32+32, 96+96
    assert all(s.endswith("_t") == tied for s in ca) and all(s.endswith("_t") == tied for s in cb)
    ta = [o.numpy() if hasattr(o, "numpy") else o for o in sa.generate_ids(list(ids[0]), 4, _greedy())]
    tb = [o.numpy() if hasattr(o, "numpy") else o for o in sb.generate_ids(list(ids[0]), 4, _greedy())]
    assert [t for t, _ in ta] == [t for t, _ in tb]  # decode_one and the cache path too
    assert not any(k.startswith("fused(") for k in a.manifest["params"])
    assert sum(k.startswith("fused(") for k in b.manifest["params"]) == 2 * 2 * 3  # 2 groups x 2 layers x 3 arrays


def _greedy():
    from shiftadd.runtime.sampling import Sampler

    return Sampler()


def test_widths_off_the_32_row_blocks_stay_separate(tiny_onnx, tmp_path):
    """Tiny Llama with hidden 72 (k/v 36 rows): padded blocks cannot be concatenated."""
    import shiftadd

    res = shiftadd.compile(tiny_onnx("llama"), tmp_path / "t.so", "q3", bits=3, group=36, windows=0, kernel="avx2")
    assert not any(k.startswith("fused(") for k in res.manifest["params"])
