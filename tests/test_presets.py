"""Named presets, optimization levels and --set overrides: what they resolve to, their errors, and a
compile through each preset giving the params an independent fit of every weight gives."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import shiftadd
from shiftadd.config import OPT_LEVELS, QUANT_PRESETS, CalibrationConfig, parse_sets, resolve
from shiftadd.frontend.onnx_import import name_weights


def test_defaults_are_the_documented_compile():
    """The default is the measured front's point (docs/BENCHMARKS.md): 4 bits, tied e5m2 scales per
    128 inputs, every matmul including lm_head."""
    o = resolve()
    assert (o.preset, o.opt_level) == ("q4-tied", "O2")
    q, c, z = o.quant, o.calibration, o.optimization
    assert (q.bits, q.group, q.scale_format, q.tied, q.offset, q.apot_terms, q.rounds, q.skip, q.avg_bits) == (
        4,
        128,
        "e5m2",
        True,
        True,
        3,
        6,
        (),
        None,
    )
    assert (c.windows, c.length, c.mode, c.refits, c.loss_aware, c.tune_scales) == (None, 128, "one-pass", 3, True, 0)
    assert (z.kernel, z.int8_batch, z.stack_siblings, z.share_kv, z.attention, z.kv_cache, z.tune) == (
        "auto",
        True,
        True,
        True,
        True,
        True,
        False,
    )


def test_overrides_parse_by_field_type():
    o = resolve(
        "q4-tied",
        "O1",
        parse_sets(
            [
                "group=256",
                "windows=0",
                "skip=",
                "avg_bits=none",
                "tied=false",
                "calibration.length=64",
                "int8_batch=yes",
            ]
        ),
    )
    assert (o.quant.bits, o.quant.group, o.quant.scale_format, o.quant.tied, o.quant.skip) == (
        4,
        256,
        "e5m2",
        False,
        (),
    )
    assert (o.calibration.windows, o.calibration.length, o.optimization.int8_batch) == (0, 64, True)
    assert resolve(overrides={"skip": "lm_head, embed"}).quant.skip == ("lm_head", "embed")
    assert resolve(overrides={"skip": ()}).quant.skip == ()
    m = resolve("mix2.5").manifest()
    assert m["preset"] == "mix2.5" and m["quant"]["avg_bits"] == 2.5 and m["opt"] == "O2"


@pytest.mark.parametrize(
    "preset, opt, sets, msg",
    [
        ("q5", "O2", {}, "unknown quantization preset 'q5'"),
        ("q3", "O9", {}, "unknown optimization level 'O9'"),
        ("q3", "O2", {"gruop": "64"}, "unknown option 'gruop'"),
        ("q3", "O2", {"quant.windows": "4"}, "unknown option 'quant.windows'"),
        ("q3", "O2", {"bits": "three"}, "--set bits=three: expected int"),
        ("q3", "O2", {"tied": "maybe"}, "--set tied=maybe: expected bool"),
        ("q3", "O2", {"avg_bits": "nan"}, "--set avg_bits=nan: expected float or none"),
        ("q3", "O2", {"skip": "("}, "skip pattern '(' is not a regular expression"),
        ("q3", "O2", {"length": "1"}, "windows >= 0 and length >= 2"),
    ],
)
def test_bad_presets_and_overrides_name_what_is_wrong(preset, opt, sets, msg):
    with pytest.raises(ValueError) as e:
        resolve(preset, opt, sets)
    assert msg in str(e.value)


def test_set_needs_key_and_value():
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_sets(["group"])


def test_every_field_has_one_section_and_levels_differ():
    from dataclasses import fields

    from shiftadd.config import FIELD_SECTION, SECTIONS

    assert sum(len(fields(c)) for c in SECTIONS.values()) == len(FIELD_SECTION)
    assert len({repr(cfg) for _, cfg in OPT_LEVELS.values()}) == len(OPT_LEVELS)
    assert CalibrationConfig().windows is None


def _weights(path: str) -> dict[str, np.ndarray]:
    model = onnx.load(path)
    name_weights(model)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("preset", sorted(QUANT_PRESETS))
def test_each_preset_compiles_to_an_independent_fit(preset, tiny_onnx, tmp_path):
    """Through the preset, every rewritten weight's packed params equal numpy-side fits of that
    weight with the preset's resolved fields (each layer's own width under a budget), packed for
    the kernel the compile used; the float preset keeps every weight as it is."""
    from shiftadd.quant.gptq import fit_layer
    from shiftadd.quant.pack import pack_bcq
    from shiftadd.schedules import lut_avx2_pack as P

    path = tiny_onnx("opt")
    res = shiftadd.compile(path, tmp_path / "m.so", preset, group=32, windows=0, stack_siblings=False)
    params = _load_params(tmp_path / "m.params")
    weights = _weights(path)
    opts = resolve(preset, overrides={"group": 32, "windows": 0, "stack_siblings": False})
    assert res.manifest["options"] == json.loads(json.dumps(opts.manifest()))  # as the .json stores it
    if not opts.quant.rewrite:
        assert res.report is None
        for name, w in weights.items():
            if name in params:
                np.testing.assert_array_equal(params[name], w)
        return
    assert res.report.rewritten
    for r in res.report.rewritten:
        w = weights[r.name]
        w = np.ascontiguousarray(w if r.transposed else w.T, np.float32)  # [N, K]
        cfg = replace(opts.bcq(), bits=r.bits)
        bw = fit_layer(w, cfg)
        packed = P.pack_avx2(bw, fp8=cfg.scale_format == "e5m2") if r.kernel == "avx2" else pack_bcq(bw, 16)
        for suffix, ref in zip((".codes", ".alpha", ".offset"), packed):
            np.testing.assert_array_equal(params[r.name + suffix], ref, err_msg=r.name + suffix)
    if opts.quant.avg_bits is not None:
        n = sum(r.k * r.n for r in res.report.rewritten)
        assert sum(r.bits * r.k * r.n for r in res.report.rewritten) / n <= opts.quant.avg_bits + 1e-9


def _load_params(path) -> dict[str, np.ndarray]:
    import tvm

    return {k: v.numpy() for k, v in tvm.runtime.load_param_dict(path.read_bytes()).items()}
