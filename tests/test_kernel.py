"""Property tests of the LUT-add TensorIR kernel against numpy references of the method's semantics."""

import contextlib
import os

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st

from shiftadd.quant import BCQConfig, quantize_matrix
from shiftadd.quant.pack import lut_matmul_reference, pack_bcq
from shiftadd.schedules.lut_kernel import build_lut_kernel
from shiftadd.schedules.targets import resolve_target

TARGET = resolve_target("cpu")
DEV = tvm.cpu(0)
FLAG, BITS = st.booleans(), st.sampled_from([2, 3, 4])  # a switch; 2-4 planes (what the fits take)


def sizes(m, k, n, **more):
    """@given strategies of a kernel test: m in the range ``m``, k in 1..``k``, n in 1..``n``, the test's
    own ``more`` (a None there draws nothing under that name), a seed."""
    shape = {"m": st.integers(*m), "k": st.integers(1, k), "n": st.integers(1, n)}
    return {name: s for name, s in {**shape, **more, "seed": st.integers(0, 2**16)}.items() if s is not None}


def lut_cases(m, k, n, pairs=(1, 2, 3, 8, 16, 40, 130), **more):
    """sizes() of a random_bcq weight on the AVX2 kernel: 1-4 planes, groups of 8 * ``pairs`` inputs (130:
    past the int16 bound), offsets or none, scales stored as float16 or e5m2, per row or per 32/64-row
    block, per plane or tied; then the test's own ``more`` (None: that one not drawn)."""
    weight = {
        "bits": st.sampled_from([1, 2, 3, 4]),
        "pairs": st.sampled_from(pairs),
        "offset": FLAG,
        "fp8": FLAG,
        "rows": st.sampled_from([1, 32, 64]),
        "tied": FLAG,
    }
    return sizes(m, k, n, **{**weight, **more})


def run_kernel(x, bw, vec):
    codes, alpha, zoff = pack_bcq(bw, vec)
    n, k = bw.shape
    f = build_lut_kernel(k, n, bw.bits, bw.group, vec, bw.offset is not None, bw.alpha_rows)
    lib = tvm.compile(tvm.IRModule({"main": f}), TARGET)
    y = tvm.runtime.empty((x.shape[0], n), "float32", DEV)
    args = [tvm.runtime.tensor(a, DEV) for a in (x, codes, alpha, zoff)]
    lib["main"](*args, y)
    return y.numpy()


@settings(max_examples=30, deadline=None)
@given(**sizes((1, 6), 70, 40, bits=BITS, group_tables=st.integers(1, 20), offset=FLAG, vec=st.sampled_from([8, 16])))
def test_kernel_matches_reference(m, k, n, bits, group_tables, offset, vec, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bw = quantize_matrix(w, BCQConfig(bits=bits, group=4 * group_tables, offset=offset, rounds=2))
    y = run_kernel(x, bw, vec)
    ref = lut_matmul_reference(x, bw)  # tables + look-ups, in float64
    dense = x.astype(np.float64) @ bw.dequantize().T.astype(np.float64)  # the plain matmul by Ŵ
    scale = max(1.0, float(np.abs(dense).max()))
    np.testing.assert_allclose(ref, dense, atol=1e-4 * scale)
    np.testing.assert_allclose(y, ref, atol=2e-5 * scale * np.sqrt(k))


@pytest.mark.parametrize("m, k, n", [(1, 576, 192), (3, 1536, 49)])
def test_kernel_model_sizes(m, k, n):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    x = rng.standard_normal((m, k)).astype(np.float32)
    bw = quantize_matrix(w, BCQConfig(bits=3, group=64))
    y = run_kernel(x, bw, 16)
    np.testing.assert_allclose(y, x.astype(np.float64) @ bw.dequantize().T, rtol=1e-4, atol=1e-4)


def block_fit(m, k, n, bits, rows, offset, seed):
    """(x [m, k], a block-layout fit of a random [n, k] weight: scales per 8 inputs x ``rows`` rows)."""
    from shiftadd.quant.gptq import quantize_matrix_gptq

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return x, quantize_matrix_gptq(
        w, np.eye(k), BCQConfig(bits=bits, offset=offset, rounds=2, layout="block", block_rows=rows), act_order=False
    )


@settings(max_examples=15, deadline=None)
@given(**sizes((1, 4), 60, 40, bits=BITS, rows=st.sampled_from([1, 3, 8, 16, 64]), offset=FLAG))
def test_block_layout_kernel(m, k, n, bits, rows, offset, seed):
    """Scales shared by ``rows`` consecutive rows and 8 inputs (the block layout), stored once."""
    x, bw = block_fit(m, k, n, bits, rows, offset, seed)
    assert bw.alpha_rows == rows and bw.group == 8
    codes, alpha, _ = pack_bcq(bw, 16)
    assert alpha.shape[2] == -(-codes.shape[2] // rows)
    y = run_kernel(x, bw, 16)
    dense = x.astype(np.float64) @ bw.dequantize().T.astype(np.float64)
    np.testing.assert_allclose(y, dense, atol=2e-5 * max(1.0, float(np.abs(dense).max())) * np.sqrt(k))


@settings(max_examples=15, deadline=None)
@given(**sizes((1, 4), 50, 30, bits=BITS, offset=FLAG))
def test_column_layout_as_one_bit_kernel(m, k, n, bits, offset, seed):
    """Column-wise scales: the one-bit kernel over the pre-scaled, concatenated activations."""
    from shiftadd.quant.gptq import quantize_matrix_gptq
    from shiftadd.quant.pack import column_as_one_bit

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    cw = quantize_matrix_gptq(
        w, np.eye(k), BCQConfig(bits=bits, offset=offset, rounds=2, layout="column"), act_order=False
    )
    one, scales = column_as_one_bit(cw)
    xs = (x[:, None, :] * scales[None]).reshape(m, -1)
    y = run_kernel(xs, one, 16)
    dense = x.astype(np.float64) @ cw.dequantize().T.astype(np.float64)
    np.testing.assert_allclose(y, dense, atol=2e-5 * max(1.0, float(np.abs(dense).max())) * np.sqrt(k))


# -- the AVX2 int8-table micro-kernel (schedules/lut_avx2.py) ---------------------------------------
@contextlib.contextmanager
def kernel_switches(**env):
    """Set (value) or unset (None) the micro-kernel's switches (SHIFTADD_NO_AVX512, SHIFTADD_NO_INT8)
    for the block; the kernel reads them again on entry and on exit (it caches them per process)."""
    from shiftadd.schedules.native import active_paths

    old = {k: os.environ.get(k) for k in env}

    def put(values):
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        active_paths()

    put(env)
    try:
        yield
    finally:
        put(old)


def run_avx2(x, bw, knobs=None, knobs_batch=None, fp8=False):
    from shiftadd.schedules import lut_avx2 as L
    from shiftadd.schedules import lut_avx2_pack as P
    from shiftadd.schedules import native as N

    N.load_in_process()
    codes, alpha, zoff = P.pack_avx2(bw, fp8)
    n, k = bw.shape
    f = L.make_lut_avx2(
        k,
        n,
        bw.bits,
        bw.group,
        bw.offset is not None,
        bw.alpha_rows,
        knobs or L.DEFAULT_KNOBS,
        knobs_batch,
        fp8,
        bw.tied,
    )
    lib = tvm.compile(tvm.IRModule({"main": f}), TARGET)
    y = tvm.runtime.empty((x.shape[0], n), "float32", DEV)
    lib["main"](*[tvm.runtime.tensor(a, DEV) for a in (x, codes, alpha, zoff)], y)
    return y.numpy()


def tie(alpha):
    """Tied scales (quant.bcq.plane_weights): plane b's = plane 0's * 2^-b."""
    return (alpha[:1] * (2.0 ** -np.arange(len(alpha)))[:, None, None]).astype(np.float32)


def random_bcq(rng, m, k, n, bits, pairs, offset, tied, rows=1, scales=(0.5, 0.375, -0.25, 2.0**-7, 3.0), zeros=False):
    """(x [m, k], columns of mixed magnitude (``zeros``: a tenth of its entries 0), a random BCQWeight
    [n, k]: ``bits`` sign planes, groups of 8 * ``pairs`` inputs, scales drawn from ``scales`` per
    ``rows`` rows and group (``tied``: plane b's = plane 0's * 2^-b), offsets drawn from -0.25, 0.125
    and 0 where ``offset``)."""
    from shiftadd.quant.bcq import BCQWeight

    group = 8 * pairs
    ng, na = -(-k // group), -(-n // rows)
    x = (rng.standard_normal((m, k)) * rng.choice([0.01, 1, 30], size=(1, k))).astype(np.float32)
    if zeros:
        x[rng.random((m, k)) < 0.1] = 0.0
    alpha = rng.choice(scales, size=(bits, na, ng)).astype(np.float32)
    alpha = tie(alpha) if tied else alpha
    bw = BCQWeight(
        signs=rng.random((bits, n, k)) < 0.5,
        group=group,
        alpha_rows=rows,
        tied=tied,
        alpha=np.repeat(alpha, rows, axis=1)[:, :n],
        offset=np.repeat(rng.choice([-0.25, 0.125, 0.0], size=(na, ng)), rows, axis=0)[:n].astype(np.float32)
        if offset
        else None,
    )
    return x, bw


def check_avx2(x, bw, y, knobs=None, knobs_batch=None):
    """Equal to the int8-table reference to float rounding, and to the float-table reference within
    the table-rounding bound (each entry off by at most half its unit's scale). A call whose knobs
    (``knobs`` at M = 1, else the batch knobs, resolved as make_lut_avx2 does) take the int8 path is
    checked against that path's reference instead."""
    from shiftadd.schedules import lut_avx2 as L
    from shiftadd.schedules import lut_avx2_reference as R
    from shiftadd.schedules import native as N

    kn = knobs or L.DEFAULT_KNOBS
    used = kn if x.shape[0] == 1 else knobs_batch or (L.DEFAULT_BATCH_KNOBS if kn == L.DEFAULT_KNOBS else kn)
    if used.path == 1 and 1 in N.active_paths():
        return check_int8(x, bw, y)
    ref = R.lut_avx2_reference(x, bw)
    table_error_bound = R.table_error_bound
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(y, ref, atol=1e-5 * scale * np.sqrt(x.shape[1] / 64 + 1))
    exact = lut_matmul_reference(x, bw)
    assert (np.abs(ref - exact) <= table_error_bound(x, bw) * (1 + 1e-6) + 1e-9 * scale).all()


def check_int8(x, bw, y):
    """The int8 path: equal to its numpy reference (exact integer dots) to float rounding, and to the
    float reference within the weight and activation rounding bound."""
    from shiftadd.schedules.lut_avx2_reference import int8_error_bound, int8_reference

    ref = int8_reference(x, bw)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(y, ref, atol=1e-5 * scale * np.sqrt(x.shape[1] / 64 + 1))
    exact = lut_matmul_reference(x, bw)
    assert (np.abs(ref - exact) <= int8_error_bound(x, bw) * (1 + 1e-5) + 1e-9 * scale).all()


pytestmark_avx2 = pytest.mark.skipif(
    not __import__("shiftadd.schedules.lut_avx2", fromlist=["x"]).target_supported(TARGET),
    reason="this CPU has no AVX2/FMA/F16C (the AVX2 kernel cannot run here)",
)


@pytestmark_avx2
@settings(max_examples=40, deadline=None)
@given(**lut_cases((1, 7), 300, 100, rows=None, knob=st.integers(0, 1000)))
def test_avx2_kernel_matches_reference(m, k, n, bits, pairs, offset, knob, fp8, tied, seed):
    """Odd shapes (K not a multiple of 8, N not of 32), M > 1, every tuning-knob kind, 1-4 planes,
    groups beyond the int16 bound (130 pairs: the kernel splits them into units), scales stored
    as float16 or as float8 e5m2 bytes (all the values drawn here are e5m2 values), per plane or tied."""
    from shiftadd.schedules.lut_avx2 import KNOB_SPACE

    x, bw = random_bcq(
        np.random.default_rng(seed), m, k, n, bits, pairs, offset, tied, scales=[0.5, 0.375, 2.0**-7, 3.0]
    )
    kn = KNOB_SPACE[knob % len(KNOB_SPACE)]
    kb = KNOB_SPACE[(knob // 7) % len(KNOB_SPACE)]
    check_avx2(x, bw, run_avx2(x, bw, kn, kb, fp8), kn, kb)


@pytestmark_avx2
@settings(max_examples=10, deadline=None)
@given(**sizes((1, 3), 80, 100, bits=BITS, rows=st.sampled_from([32, 64, 96]), offset=FLAG))
def test_avx2_kernel_block_scales(m, k, n, bits, rows, offset, seed):
    """The block layout (scales per 8 inputs x ``rows`` rows, rows a multiple of 32) on the AVX2 kernel."""
    x, bw = block_fit(m, k, n, bits, rows, offset, seed)
    check_avx2(x, bw, run_avx2(x, bw))  # M > 1: the default batch knobs (the int8 path where the CPU has it)


@pytestmark_avx2
@settings(max_examples=40, deadline=None)
@given(**lut_cases((2, 15), 300, 100, mt=st.sampled_from([1, 2, 4, 6]), tasks=st.sampled_from([0, 1]), avx2=FLAG))
def test_int8_path_matches_reference(m, k, n, bits, pairs, offset, mt, tasks, fp8, rows, avx2, tied, seed):
    """The dequantise-to-int8 path (M > 1) over odd shapes (K not a multiple of the group or of 4, N
    not of 8, 16 or 32, M not of the rows per pass), every rows-per-pass knob and thread split, 1-4
    planes, groups of 8 to 1040 inputs, per-row and block (32/64-row) scales, float16 and e5m2
    storage, per-plane or tied scales, negative and zero scales (a zero-scale row group must
    dequantise to zero), on AVX-512 VNNI where the CPU has it and on AVX2 (``avx2``:
    SHIFTADD_NO_AVX512, what Zen 3 runs)."""
    from shiftadd.schedules.lut_avx2 import Knobs

    scales = [0.5, 0.375, -0.25, 2.0**-7, 3.0, 0.0]  # negative and zero scales too
    x, bw = random_bcq(np.random.default_rng(seed), m, k, n, bits, pairs, offset, tied, rows, scales, zeros=True)
    kb = Knobs(mt, 1, tasks, 1)
    with kernel_switches(SHIFTADD_NO_AVX512="1" if avx2 else None):
        check_avx2(x, bw, run_avx2(x, bw, knobs_batch=kb, fp8=fp8), knobs_batch=kb)


@pytestmark_avx2
@settings(max_examples=30, deadline=None)
@given(**lut_cases((1, 3), 300, 200, [1, 2, 3, 8, 130], rbk=st.sampled_from([1, 2, 4])))
def test_wide_lut_path_matches_reference(m, k, n, bits, pairs, offset, rbk, fp8, rows, tied, seed):
    """The 512-bit LUT path (two planes per load; an odd last plane on 256-bit registers) equals the
    LUT reference over odd shapes (N not a multiple of 16, 32 or the row blocks per pass), 1-4
    planes, per-row and block scales, per-plane or tied, float16 and e5m2 storage; M > 1 rows run it
    one at a time."""
    from shiftadd.schedules.lut_avx2 import Knobs

    x, bw = random_bcq(np.random.default_rng(seed), m, k, n, bits, pairs, offset, tied, rows)
    kn = Knobs(1, rbk, 0, 2)
    check_avx2(x, bw, run_avx2(x, bw, kn, kn, fp8), kn, kn)


@pytestmark_avx2
@settings(max_examples=30, deadline=None)
@given(
    **lut_cases((1, 7), 1200, 140, [1, 2, 3, 16, 40, 130], bits=None, tied=None, knob=st.integers(0, 1000), avx2=FLAG)
)
def test_row_interleaved_tied_4bit_matches_reference(m, k, n, pairs, offset, knob, fp8, rows, avx2, seed):
    """Tied 4-bit codes are stored row-interleaved ([NB, P, 32, 4]: the same bytes as the plane-major
    layout, transposed) and every path reads them: the 256- and 512-bit LUT paths (planes summed by
    multiply-adds, int16 stages of at most 32 pairs: groups up to 130 pairs cross them) and the int8
    paths (VNNI, and AVX2 with ``avx2``: SHIFTADD_NO_AVX512), over odd shapes, every knob kind, per-row
    and block scales, float16 and e5m2 storage."""
    from dataclasses import replace

    from shiftadd.schedules.lut_avx2 import KNOB_SPACE, dims
    from shiftadd.schedules.lut_avx2_pack import pack_avx2

    x, bw = random_bcq(np.random.default_rng(seed), m, k, n, 4, pairs, offset, True, rows)
    codes = pack_avx2(bw, fp8)[0]
    d = dims(k, n, bw.group, rows)
    assert codes.shape == (d["nb"], d["pairs"], 32, 4)
    assert np.array_equal(codes.transpose(0, 1, 3, 2), pack_avx2(replace(bw, tied=False))[0])
    kn = KNOB_SPACE[knob % len(KNOB_SPACE)]
    kb = KNOB_SPACE[(knob // 7) % len(KNOB_SPACE)]
    with kernel_switches(SHIFTADD_NO_AVX512="1" if avx2 else None):
        check_avx2(x, bw, run_avx2(x, bw, kn, kb, fp8), kn, kb)


@pytestmark_avx2
@pytest.mark.parametrize("sign", [True, False])
def test_row_interleaved_int16_stage_holds_the_largest_sums(sign):
    """The largest sums the row-interleaved LUT paths meet: equal activations and equal signs make every
    looked-up entry +-127, so each pair adds +-762 to a row's int16 stage; a 130-pair group (units of 65
    pairs) would overflow int16 without the kernel's 32-pair stages."""
    from shiftadd.quant.bcq import BCQWeight
    from shiftadd.schedules.lut_avx2 import Knobs

    k, n = 1040, 40
    x = np.ones((2, k), np.float32)
    bw = BCQWeight(signs=np.full((4, n, k), sign), group=k, tied=True, alpha=tie(np.full((4, n, 1), 0.5, np.float32)))
    for kn in (Knobs(1, 1, 0, 0), Knobs(2, 1, 0, 0), Knobs(1, 4, 0, 2)):
        for avx2 in (None, "1"):
            with kernel_switches(SHIFTADD_NO_AVX512=avx2):
                y = run_avx2(x, bw, kn, kn)
            check_avx2(x, bw, y, kn, kn)
            np.testing.assert_allclose(y, (1 if sign else -1) * 0.5 * 1.875 * k, rtol=1e-6)


@pytestmark_avx2
def test_kernel_switches_pick_the_path():
    """SHIFTADD_NO_AVX512 (what an AVX2-only CPU runs) sends a path-2 call to the 256-bit LUT path and
    a path-1 batch to the int8 path on AVX2; SHIFTADD_NO_INT8 sends the path-1 batch to the LUT path.
    The same compiled function equals the matching reference each time; the int8 path gives the same
    bits on AVX2 as on VNNI (the same integers, the same float ops per lane)."""
    from shiftadd.quant.bcq import BCQWeight
    from shiftadd.schedules.lut_avx2 import Knobs
    from shiftadd.schedules.lut_avx2_reference import int8_reference, lut_avx2_reference
    from shiftadd.schedules.native import active_paths, int8_isa

    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 130)).astype(np.float32)
    bw = BCQWeight(
        signs=rng.random((3, 41, 130)) < 0.5,
        group=64,
        alpha=rng.choice([0.5, 0.375, 2.0**-7], size=(3, 41, 3)).astype(np.float32),
        offset=rng.choice([-0.25, 0.125], size=(41, 3)).astype(np.float32),
    )
    kb, wide = Knobs(6, 1, 0, 1), Knobs(1, 4, 0, 2)
    lut, i8 = lut_avx2_reference(x, bw), int8_reference(x, bw)
    native = run_avx2(x, bw, knobs_batch=kb)
    np.testing.assert_allclose(native, i8, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(run_avx2(x, bw, wide, wide), lut, rtol=1e-5, atol=1e-4)
    with kernel_switches(SHIFTADD_NO_AVX512="1"):
        assert active_paths() == {0, 1} and int8_isa() == "avx2"
        assert np.array_equal(run_avx2(x, bw, knobs_batch=kb), native)
        np.testing.assert_allclose(run_avx2(x, bw, wide, wide), lut, rtol=1e-5, atol=1e-4)
    with kernel_switches(SHIFTADD_NO_INT8="1"):
        assert 1 not in active_paths() and int8_isa() is None
        np.testing.assert_allclose(run_avx2(x, bw, knobs_batch=kb), lut, rtol=1e-5, atol=1e-4)
    assert 1 in active_paths()  # switches restored


@pytestmark_avx2
def test_avx2_kernel_rejects_layouts_it_cannot_read():
    from shiftadd.quant.bcq import BCQWeight
    from shiftadd.schedules.lut_avx2 import make_lut_avx2
    from shiftadd.schedules.lut_avx2_pack import pack_avx2

    bw = BCQWeight(signs=np.zeros((2, 5, 12), bool), alpha=np.ones((2, 5, 1), np.float32), group=12)
    with pytest.raises(ValueError, match="group 12"):
        pack_avx2(bw)
    fp16_only = BCQWeight(signs=np.zeros((2, 5, 16), bool), alpha=np.full((2, 5, 1), 1.0625, np.float32), group=16)
    with pytest.raises(ValueError, match="scale 1.0625 is not a float8 e5m2 value"):
        pack_avx2(fp16_only, fp8=True)
    with pytest.raises(ValueError, match="rows per scale 16"):
        make_lut_avx2(16, 5, 2, 8, alpha_rows=16)
    # a plane count the micro-kernel was not built for is a clear runtime error, never garbage
    five = BCQWeight(signs=np.ones((5, 32, 64), bool), alpha=np.full((5, 32, 1), 0.5, np.float32), group=64)
    with pytest.raises(RuntimeError, match="unsupported bits or knobs"):
        run_avx2(np.ones((1, 64), np.float32), five)


@pytestmark_avx2
def test_tied_scales_store_one_plane_and_compute_the_same():
    """Tied scales keep one scale per (row, group) instead of q, and every path computes what the
    same weights give with the q scales stored (the LUT paths add the planes' integer sums by shifts:
    exact, so equal to float rounding; the int8 path dequantises the same integers: equal bit for bit).
    Packing refuses scales that are not tied."""
    from dataclasses import replace

    from shiftadd.quant.bcq import BCQWeight
    from shiftadd.schedules.lut_avx2 import Knobs
    from shiftadd.schedules.lut_avx2_pack import pack_avx2

    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 200)).astype(np.float32)
    alpha = tie(rng.choice([0.5, 0.375, 3.0], size=(4, 70, 2)).astype(np.float32))
    tied = BCQWeight(
        signs=rng.random((4, 70, 200)) < 0.5,
        group=128,
        alpha=alpha,
        tied=True,
        offset=rng.choice([-0.25, 0.125], size=(70, 2)).astype(np.float32),
    )
    planes = replace(tied, tied=False)
    assert pack_avx2(tied)[1].shape[2] == 1 and pack_avx2(planes)[1].shape[2] == 4
    assert pack_avx2(tied, fp8=True)[1].nbytes * 4 == pack_avx2(planes, fp8=True)[1].nbytes
    for kn in (Knobs(1, 1, 0, 0), Knobs(1, 2, 0, 2), Knobs(2, 1, 0, 0)):
        np.testing.assert_allclose(run_avx2(x, tied, kn, kn), run_avx2(x, planes, kn, kn), rtol=1e-6, atol=1e-5)
    kb = Knobs(4, 1, 0, 1)
    assert np.array_equal(run_avx2(x, tied, knobs_batch=kb), run_avx2(x, planes, knobs_batch=kb))
    with pytest.raises(ValueError, match="tied scales"):
        pack_avx2(replace(tied, alpha=alpha[::-1].copy()))
