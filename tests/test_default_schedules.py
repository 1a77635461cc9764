"""The default schedules and the inline exponentials against numpy: elementwise operators, norms and
softmaxes over symbolic row counts and odd widths, as a prompt's prefill runs them."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax, s_tir, te

from shiftadd.schedules.vector_math import fast_exp, vectorisable_math

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


@pytest.mark.parametrize("lanes", [1, 16])
def test_exp_and_sigmoid_match_float64(lanes):
    """Within 1 ulp of float64's exp over float32's whole range, vectorised or not; 0 / inf / NaN
    where expf gives them; sigmoid within float32 rounding."""
    n = te.var("n")
    a = te.placeholder((n,), name="a")
    e = te.compute((n,), lambda i: te.exp(a[i]), name="e")
    s = te.compute((n,), lambda i: te.sigmoid(a[i]), name="s")
    sch = s_tir.Schedule(vectorisable_math(te.create_prim_func([a, e, s])))
    if lanes > 1:
        for name in ("e", "s"):
            (i,) = sch.get_loops(sch.get_sblock(name))
            outer, inner = sch.split(i, factors=[None, lanes])
            sch.vectorize(inner)
    assert "expf" not in tvm.compile(sch.mod, TARGET).mod.inspect_source("asm")
    fn = tvm.compile(sch.mod, TARGET).mod["main"]
    x = np.concatenate(
        [np.linspace(-110, 90, 400_000, dtype=np.float32), [np.nan, np.inf, -np.inf, 0.0, -0.0, 88.7, -87.4, -103.0]]
    ).astype(np.float32)
    x = np.concatenate([x, np.zeros((-len(x)) % 16, np.float32)])
    out = [tvm.runtime.tensor(np.zeros_like(x)) for _ in range(2)]
    fn(tvm.runtime.tensor(x), *out)
    got_e, got_s = (o.numpy() for o in out)
    with np.errstate(over="ignore", invalid="ignore"):
        ref_e = np.exp(x.astype(np.float64)).astype(np.float32)
        ref_s = (1 / (1 + np.exp(-x.astype(np.float64)))).astype(np.float32)
    normal = np.isfinite(ref_e) & (ref_e >= np.finfo(np.float32).tiny)
    assert _ulps(got_e[normal], ref_e[normal]).max() <= 1
    tiny = np.isfinite(ref_e) & ~normal  # denormal results: one rounding of the exact value
    assert np.abs(got_e[tiny] - ref_e[tiny]).max() <= np.float32(2e-45)
    assert np.array_equal(np.isnan(got_e), np.isnan(x))
    assert np.all(got_e[(x > 89) & ~np.isnan(x)] == np.inf) and np.all(got_e[x < -104] == 0)
    assert np.array_equal(np.isnan(got_s), np.isnan(x))
    fin = ~np.isnan(x)
    np.testing.assert_allclose(got_s[fin], ref_s[fin], rtol=4e-7, atol=1e-38)


def test_erf_matches_float64():
    """GELU's erf within 4e-7 of the exact value, vectorised, NaN kept, +-1 far out."""
    import math

    n = te.var("n")
    a = te.placeholder((n,), name="a")
    sch = s_tir.Schedule(
        vectorisable_math(te.create_prim_func([a, te.compute((n,), lambda i: te.erf(a[i]), name="e")]))
    )
    (i,) = sch.get_loops(sch.get_sblock("e"))
    sch.vectorize(sch.split(i, factors=[None, 16])[1])
    fn = tvm.compile(sch.mod, TARGET).mod["main"]
    x = np.concatenate([np.linspace(-7, 7, 200_000, dtype=np.float32), [np.nan, np.inf, -np.inf, 0.0, 1e-30]])
    x = np.concatenate([x, np.zeros((-len(x)) % 16, np.float32)]).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros_like(x))
    fn(tvm.runtime.tensor(x), out)
    got = out.numpy()
    fin = np.isfinite(x)
    ref = np.array([math.erf(float(v)) for v in x[fin]])
    assert np.abs(got[fin] - ref).max() <= 4e-7
    assert np.isnan(got[np.isnan(x)]).all() and got[x == np.inf][0] == 1 and got[x == -np.inf][0] == -1


def test_other_dtypes_keep_their_exp():
    """Only float32 calls are replaced: a float64 exp keeps libm's precision."""
    a = te.placeholder((8,), "float64", name="a")
    f = te.create_prim_func([a, te.compute((8,), lambda i: te.exp(a[i]), name="e")])
    assert vectorisable_math(f).same_as(f)
    assert fast_exp is not None


def _build(func):
    from shiftadd.relax_passes.pipeline import Pipeline

    mod = Pipeline(TARGET).run(tvm.IRModule({"main": func}), "lower", "schedule")
    return relax.VirtualMachine(tvm.compile(mod, TARGET, relax_pipeline=None), tvm.cpu())


def _function(shapes: list[tuple], body) -> relax.Function:
    """``main(*args) = body(*args)`` over float32 tensors of ``shapes`` (str entries: symbolic)."""
    names = {d for shape in shapes for d in shape if isinstance(d, str)}
    sym = {n: tvm.tirx.Var(n, "int64") for n in sorted(names)}
    params = [
        relax.Var(f"x{i}", relax.TensorType([sym.get(d, d) for d in shape], "float32"))
        for i, shape in enumerate(shapes)
    ]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(*params))
        bb.emit_func_output(out)
    return bb.get()["main"]


def _silu_gate():
    return _function([("b", "s", "n"), ("b", "s", "n")], lambda x, y: relax.op.multiply(relax.op.nn.silu(x), y))


def _rms_norm(width: int):
    return _function([("b", "s", width), (width,)], lambda x, w: relax.op.nn.rms_norm(x, w, axes=[-1], epsilon=1e-5))


def _softmax_transpose():
    return _function(
        [("b", "h", "s", "n")], lambda x: relax.op.permute_dims(relax.op.nn.softmax(x, axis=-1), [0, 2, 1, 3])
    )


@settings(max_examples=6, deadline=None)
@given(rows=st.integers(1, 37), width=st.sampled_from([16, 48, 72, 100, 576]), seed=st.integers(0, 2**16))
def test_elementwise_and_norms_over_symbolic_rows(rows, width, seed):
    """SiLU-gate, RMSNorm and softmax + transpose at a prompt's symbolic row count, widths that are
    and are not multiples of the vector width, against numpy in float64."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, rows, width)) * 4).astype(np.float32)
    y = rng.standard_normal((1, rows, width)).astype(np.float32)
    w = rng.standard_normal(width).astype(np.float32)
    x64 = x.astype(np.float64)

    vm = _build(_silu_gate())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()
    np.testing.assert_allclose(got, x64 / (1 + np.exp(-x64)) * y, rtol=2e-6, atol=1e-6)

    vm = _build(_rms_norm(width))
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    ref = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)

    s = x.reshape(1, 1, rows, width).repeat(3, axis=1)
    vm = _build(_softmax_transpose())
    got = vm["main"](tvm.runtime.tensor(s)).numpy()
    e = np.exp(s.astype(np.float64) - s.max(-1, keepdims=True))
    np.testing.assert_allclose(got, (e / e.sum(-1, keepdims=True)).transpose(0, 2, 1, 3), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("rows, cols, depth", [(257, 257, 64), (19, 37, 8), (4, 32, 16)])
def test_batched_matmul_tiles_per_head(rows, cols, depth):
    """Attention's q @ k^T with static ragged sizes (a ViT's 257 tokens): tiles within one head, rows
    and columns padded, against numpy."""
    func = _function([("b", 3, rows, depth), ("b", 3, depth, cols)], lambda q, k: relax.op.matmul(q, k))
    rng = np.random.default_rng(rows)
    q = rng.standard_normal((2, 3, rows, depth)).astype(np.float32)
    k = rng.standard_normal((2, 3, depth, cols)).astype(np.float32)
    got = _build(func)["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(k)).numpy()
    np.testing.assert_allclose(got, q.astype(np.float64) @ k, rtol=1e-4, atol=1e-4)
