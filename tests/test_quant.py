"""BCQ + APoT math against direct numpy checks."""

import numpy as np
import pytest
import torch

from shiftadd.quant import BCQConfig, apot_decompose, apot_round, quantize_matrix


def test_apot_is_a_sum_of_signed_powers_of_two():
    a = torch.tensor([0.3, -0.7, 1e-3, 5.25, 0.0, -(2.0**-9), 0.123456], dtype=torch.float64)
    for terms in (1, 2, 3):
        r = apot_round(a, terms)
        signs, exps = apot_decompose(a, terms)
        rebuilt = (signs.double() * torch.exp2(exps.double())).sum(-1)
        assert torch.equal(rebuilt, r)
        assert (signs != 0).sum(-1).max() <= terms
    assert torch.equal(
        apot_round(torch.tensor([0.25, -4.0, 0.0]), 3), torch.tensor([0.25, -4.0, 0.0], dtype=torch.float64)
    )


def test_apot_error_shrinks_with_terms_and_keeps_negative_terms():
    a = torch.linspace(0.01, 3, 997, dtype=torch.float64)
    errs = [float(((apot_round(a, t) - a).abs() / a).max()) for t in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.07
    signs, _ = apot_decompose(torch.tensor([0.7]), 3)  # 0.7 = 2^0 - 2^-2 - 2^-5 ...: a negative term
    assert (signs == -1).any()


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bcq_structure_and_error(bits, offset):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((23, 72)).astype(np.float32)  # 72 = one group of 64 + a ragged one of 8
    bw = quantize_matrix(w, BCQConfig(bits=bits, group=64, offset=offset))
    assert bw.signs.shape == (bits, 23, 72) and bw.alpha.shape == (bits, 23, 2)
    deq = bw.dequantize()
    # every group holds at most 2^q distinct values: z + Σ ±α_b
    for n in range(23):
        for g0, g1 in ((0, 64), (64, 72)):
            assert len(np.unique(deq[n, g0:g1])) <= 2**bits
    # reconstruction is exactly Σ α_b (2B_b - 1) (+ z), recomputed here independently
    b = np.where(bw.signs, 1.0, -1.0)
    a = np.concatenate([np.repeat(bw.alpha[:, :, :1], 64, 2), np.repeat(bw.alpha[:, :, 1:], 8, 2)], 2)
    ref = (a * b).sum(0) + (
        np.concatenate([np.repeat(bw.offset[:, :1], 64, 1), np.repeat(bw.offset[:, 1:], 8, 1)], 1) if offset else 0
    )
    np.testing.assert_allclose(deq, ref, rtol=1e-6, atol=1e-6)
    rel = np.linalg.norm(deq - w) / np.linalg.norm(w)
    assert rel < {2: 0.45, 3: 0.25, 4: 0.13}[bits]


def test_more_bits_less_error_and_refinement_helps():
    w = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    errs = [np.linalg.norm(quantize_matrix(w, BCQConfig(bits=b, group=32)).dequantize() - w) for b in (2, 3, 4)]
    assert errs[0] > errs[1] > errs[2]
    e0 = np.linalg.norm(quantize_matrix(w, BCQConfig(bits=3, group=32, rounds=0, offset=False)).dequantize() - w)
    e6 = np.linalg.norm(quantize_matrix(w, BCQConfig(bits=3, group=32, rounds=6, offset=False)).dequantize() - w)
    assert e6 < e0


def test_deterministic():
    w = np.random.default_rng(2).standard_normal((40, 96)).astype(np.float32)
    a = quantize_matrix(w, BCQConfig(bits=3, group=32))
    b = quantize_matrix(w, BCQConfig(bits=3, group=32))
    assert np.array_equal(a.signs, b.signs) and np.array_equal(a.alpha, b.alpha) and np.array_equal(a.offset, b.offset)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"bits": 5}, "bits must be one of"),
        ({"bits": 1}, "bits must be one of"),
        ({"group": 7}, "multiple of 4"),
        ({"group": 0}, "multiple of 4"),
        ({"apot_terms": 0}, "apot_terms"),
        ({"rounds": -1}, "rounds"),
        ({"tied": True, "layout": "block"}, "tied scales are a row-group layout"),
    ],
)
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        BCQConfig(**kw)


def test_bad_matrix():
    with pytest.raises(ValueError, match="2-D"):
        quantize_matrix(np.zeros((3,), np.float32), BCQConfig())
    with pytest.raises(ValueError, match="NaN"):
        quantize_matrix(np.full((4, 8), np.nan, np.float32), BCQConfig(group=4))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_scales_and_offsets_are_apot_and_exact_in_float16(bits):
    """Every stored scale and offset is a sum of <= apot_terms signed powers of two, exact in float16
    (the packer refuses anything else), also when the fit keeps its initial grid."""
    from shiftadd.quant.pack import pack_bcq

    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 2.0, (64, 1))).astype(np.float32)
    for rounds in (0, 6):
        bw = quantize_matrix(w, BCQConfig(bits=bits, group=64, rounds=rounds))
        for a in (bw.alpha, bw.offset):
            t = torch.from_numpy(a.astype(np.float64))
            assert torch.equal(apot_round(t, 3), t)
            assert np.array_equal(a.astype(np.float16).astype(np.float32), a)
        pack_bcq(bw, 16)


def test_e5m2_scales_are_nearest_and_one_byte():
    """e5m2 rounding gives the nearest float8 e5m2 value (checked against its neighbours in the
    float16 bit pattern, whose high byte it is), and a fit with scale_format='e5m2' stores only such
    values (the packer turns them into single bytes)."""
    import torch

    from shiftadd.quant.apot import e5m2_round
    from shiftadd.schedules.lut_avx2_pack import e5m2_bytes

    rng = np.random.default_rng(0)
    a = (rng.standard_normal(5000) * np.exp2(rng.integers(-14, 8, 5000))).astype(np.float32)
    r = e5m2_round(torch.from_numpy(a)).numpy()
    h = r.astype(np.float16).view(np.uint16)
    assert ((h & 0xFF) == 0).all()
    # every finite e5m2 value: the float16 patterns whose low byte is zero
    table = (np.arange(256, dtype=np.uint16) << 8).view(np.float16).astype(np.float64)
    table = table[np.isfinite(table)]
    best = np.abs(table[None, :] - a[:, None].astype(np.float64)).min(1)
    np.testing.assert_array_equal(np.abs(r.astype(np.float64) - a), best)
    w = rng.standard_normal((48, 200)).astype(np.float32) * 0.05
    for bits in (2, 3, 4):
        bw = quantize_matrix(w, BCQConfig(bits=bits, group=64, scale_format="e5m2", rounds=3))
        e5m2_bytes(bw.alpha, "scale")
        e5m2_bytes(bw.offset, "offset")
        fp16 = quantize_matrix(w, BCQConfig(bits=bits, group=64, rounds=3))
        # one byte per scale costs some accuracy, but stays within 1.5x of the float16 APoT error
        assert np.linalg.norm(bw.dequantize() - w) < 1.5 * np.linalg.norm(fp16.dequantize() - w)
    with pytest.raises(ValueError, match="scale_format must be one of"):
        BCQConfig(scale_format="fp8")


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tied_scales_are_the_uniform_grid(bits, offset):
    """Tied scales (α_b = α_0 2^-b, exactly): each group's values lie on the uniform grid
    z + α_0 (2j + 1 - 2^q) / 2^(q-1), and the weight error is no worse than numpy's round-to-nearest
    on the same kind of grid (asymmetric: spanning [min, max]; symmetric: ±max|w|) with unrounded scales."""
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((40, 136)).astype(np.float32)  # two groups of 64 and a ragged one of 8
    bw = quantize_matrix(w, BCQConfig(bits=bits, group=64, offset=offset, tied=True))
    assert bw.tied and np.array_equal(bw.alpha, bw.alpha[:1] * (2.0 ** -np.arange(bits))[:, None, None])
    deq = bw.dequantize().astype(np.float64)
    bounds = (0, 64, 128, 136)
    rtn_err = 0.0
    for gi, (g0, g1) in enumerate(zip(bounds[:-1], bounds[1:])):
        z = bw.offset[:, gi : gi + 1] if offset else 0.0
        lev = (deq[:, g0:g1] - z) / bw.alpha[0, :, gi : gi + 1] * 2 ** (bits - 1)  # odd integers in ±(2^q - 1)
        assert np.allclose(lev, np.round(lev), atol=1e-4) and (np.abs(np.round(lev)) % 2 == 1).all()
        v = w[:, g0:g1].astype(np.float64)
        if offset:
            lo, hi = v.min(1, keepdims=True), v.max(1, keepdims=True)
            step = (hi - lo) / (2**bits - 1)
            rtn = np.round((v - lo) / step) * step + lo
        else:
            step = 2 * np.abs(v).max(1, keepdims=True) / (2**bits - 1)
            rtn = (np.clip(np.floor(v / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + 0.5) * step
        rtn_err += ((rtn - v) ** 2).sum()
    assert ((deq - w) ** 2).sum() <= 1.001 * rtn_err
