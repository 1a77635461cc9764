"""The LUT kernel's tuning database: tune once, reuse, never apply a stale entry."""

import json
import warnings

import numpy as np
import pytest

import shiftadd
from shiftadd.schedules import lut_avx2
from shiftadd.schedules import native as N
from shiftadd.schedules.targets import resolve_target
from shiftadd.tuning.database import TuningDB, key_of

from .conftest import ragged_batch

pytestmark = pytest.mark.skipif(
    not lut_avx2.target_supported(resolve_target("cpu")), reason="this CPU has no AVX2/FMA/F16C"
)


def test_compile_tunes_once_then_reads_the_database(tiny_onnx, tmp_path):
    path = tiny_onnx("opt")
    db = tmp_path / "db"
    first = shiftadd.compile(path, tmp_path / "a.so", "q3", bits=2, group=32, tune=True, db=db)
    t = first.manifest["tuning"]
    kernels = {(r.k, r.n) for r in first.report.rewritten} | {(64, 3 * 64)}  # + OPT's q/k/v stacked in one call
    assert any(k.startswith("fused(") for k in first.manifest["params"])
    assert t["tuned_now"] == len(kernels) and t["default"] == 0 and t["from_db"] == len(kernels)
    data = json.loads((db / "tuning.json").read_text())
    assert len(data["entries"]) == len(kernels)
    for e in data["entries"].values():
        assert (
            lut_avx2.Knobs(**e["decode"]) in lut_avx2.KNOB_SPACE and lut_avx2.Knobs(**e["batch"]) in lut_avx2.KNOB_SPACE
        )
        assert min(e["ms"]["decode"].values()) > 0
    second = shiftadd.compile(path, tmp_path / "b.so", "q3", bits=2, group=32, tune=True, db=db)
    assert second.manifest["tuning"]["tuned_now"] == 0 and second.manifest["tuning"]["from_db"] == len(kernels)
    untuned = shiftadd.compile(path, tmp_path / "c.so", "q3", bits=2, group=32, db=tmp_path / "empty")
    assert untuned.manifest["tuning"]["default"] == len(kernels)
    # within a path knobs change the schedule, never the arithmetic: tuned and default kernels agree
    # bit for bit (M = 1: the 256- and 512-bit LUT paths add the same integers in the same order; a
    # batch on the int8 path vs the LUT path differs by their roundings, so only within the path)
    ids, mask = ragged_batch(3, 2, 7)
    feed = {"input_ids": ids, "attention_mask": mask}
    a = shiftadd.load(second.so).run(None, feed)[0]
    b = shiftadd.load(untuned.so).run(None, feed)[0]
    one = {"input_ids": ids[:1, :1], "attention_mask": mask[:1, :1]}
    int8 = 1 in N.active_paths()
    batch_paths = {lut_avx2.Knobs(**e["batch"]).path == 1 and int8 for e in data["entries"].values()}
    if batch_paths == {lut_avx2.DEFAULT_BATCH_KNOBS.path == 1 and int8}:
        assert np.array_equal(a, b)
    else:  # some kernel tuned onto the other batch path: equal to within the kernels' roundings
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05 * float(np.abs(b).max()))
    assert np.array_equal(shiftadd.load(second.so).run(None, one)[0], shiftadd.load(untuned.so).run(None, one)[0])


def test_stale_database_is_ignored_with_a_warning(tmp_path):
    db = TuningDB.open(tmp_path / "t.json")
    db.put(
        key_of(64, 32, 2, 32, True, 1),
        {"decode": {"mt": 1, "rbk": 2, "tasks": 1}, "batch": {"mt": 2, "rbk": 1, "tasks": 0}, "ms": {}},
    )
    assert TuningDB.open(tmp_path / "t.json").get(64, 32, 2, 32, True, 1) == (
        lut_avx2.Knobs(1, 2, 1),
        lut_avx2.Knobs(2, 1, 0),
    )
    data = json.loads((tmp_path / "t.json").read_text())
    data["context"]["tvm"] = "0.0.1"
    data["context"]["cpu"] = "another CPU"
    (tmp_path / "t.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"1 entries were tuned for another context \(cpu, tvm differ\)"):
        stale = TuningDB.open(tmp_path / "t.json")
    assert stale.get(64, 32, 2, 32, True, 1) is None
    assert stale.knobs(64, 32, 2, 32, True, 1) == stale.untuned_knobs(2)  # shipped for this CPU, else the rule


def test_int8_batch_off_keeps_the_lut_path(tmp_path):
    """int8=False replaces an int8 batch pick by the fastest LUT candidate the entry timed (the
    default LUT batch knobs without one); decode knobs and other picks are untouched."""
    db = TuningDB.open(tmp_path / "t.json")
    key = key_of(64, 32, 2, 32, True, 1)
    db.put(
        key,
        {
            "decode": {"mt": 1, "rbk": 4, "tasks": 0, "path": 2},
            "batch": {"mt": 4, "rbk": 1, "tasks": 0, "path": 1},
            "ms": {"batch": {"i8m4t0": 0.1, "m4r1t0": 0.5, "m2r2t0": 0.3, "wm1r4t0": 0.4}},
        },
    )
    wide, i8 = lut_avx2.Knobs(1, 4, 0, 2), lut_avx2.Knobs(4, 1, 0, 1)
    assert db.knobs(64, 32, 2, 32, True, 1) == (wide, i8)
    assert db.knobs(64, 32, 2, 32, True, 1, int8=False) == (wide, lut_avx2.Knobs(2, 2, 0))
    assert db.knobs(64, 64, 2, 32, True, 1, int8=False) == (db.untuned_knobs(2)[0], lut_avx2.LUT_BATCH_KNOBS)
    db.put(key, {"decode": {"mt": 1, "rbk": 4, "tasks": 0}, "batch": {"mt": 2, "rbk": 1, "tasks": 1}, "ms": {}})
    assert db.knobs(64, 32, 2, 32, True, 1, int8=False)[1] == lut_avx2.Knobs(2, 1, 1)


def test_compile_without_int8_batch_computes_the_lut_tables(tiny_onnx, tmp_path, monkeypatch):
    """compile(int8_batch=False): a batch runs the LUT tables, i.e. exactly what the default
    compile computes with the int8 path switched off (SHIFTADD_NO_INT8)."""
    path = tiny_onnx("opt")
    default = shiftadd.compile(path, tmp_path / "a.so", "q3", bits=3, group=32, db=tmp_path / "db")
    lut = shiftadd.compile(path, tmp_path / "b.so", "q3", bits=3, group=32, db=tmp_path / "db", int8_batch=False)
    assert lut.manifest["tuning"]["int8_batch"] is False
    ids, mask = ragged_batch(2, 3, 9)
    feed = {"input_ids": ids, "attention_mask": mask}
    a = shiftadd.load(lut.so).run(None, feed)[0]
    int8 = TuningDB.open(tmp_path / "db").untuned_knobs(3)[1].path == 1  # this CPU's pick for these (untuned) kernels
    if int8 and 1 in N.active_paths():  # here the default compile's batch took the int8 path: other roundings
        b = shiftadd.load(default.so).run(None, feed)[0]
        assert not np.array_equal(a, b)
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05 * float(np.abs(a).max()))
    monkeypatch.setenv("SHIFTADD_NO_INT8", "1")
    assert 1 not in N.active_paths()  # the micro-kernel reads the variable again here
    try:
        assert np.array_equal(a, shiftadd.load(default.so).run(None, feed)[0])
        assert np.array_equal(a, shiftadd.load(lut.so).run(None, feed)[0])
    finally:
        monkeypatch.delenv("SHIFTADD_NO_INT8")
        N.active_paths()


def test_unreadable_database_names_the_file(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"t\.json: not readable JSON"):
        TuningDB.open(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object"):
        TuningDB.open(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TuningDB.open(tmp_path / "missing.json").entries == {}


def test_knobs_of_one_thread_pool_regime_are_not_applied_in_the_other(tmp_path, monkeypatch):
    """Idle TVM workers sleep with TVM_THREAD_POOL_SPIN_COUNT=0 and spin by default: which thread
    split wins differs, so an entry tuned in one regime is a miss in the other."""
    monkeypatch.delenv("TVM_THREAD_POOL_SPIN_COUNT", raising=False)
    db = TuningDB.open(tmp_path / "t.json")
    entry = {"decode": {"mt": 1, "rbk": 1, "tasks": 0}, "batch": {"mt": 2, "rbk": 1, "tasks": 0}, "ms": {}}
    db.put(key_of(64, 32, 2, 32, True, 1), entry)
    assert TuningDB.open(tmp_path / "t.json").get(64, 32, 2, 32, True, 1) is not None
    monkeypatch.setenv("TVM_THREAD_POOL_SPIN_COUNT", "0")
    assert key_of(64, 32, 2, 32, True, 1).endswith(" spin0")
    assert TuningDB.open(tmp_path / "t.json").get(64, 32, 2, 32, True, 1) is None
    db = TuningDB.open(tmp_path / "t.json")
    db.put(key_of(64, 32, 2, 32, True, 1), {**entry, "decode": {"mt": 1, "rbk": 1, "tasks": 1}})
    assert db.get(64, 32, 2, 32, True, 1)[0].tasks == 1
    monkeypatch.delenv("TVM_THREAD_POOL_SPIN_COUNT")
    assert TuningDB.open(tmp_path / "t.json").get(64, 32, 2, 32, True, 1)[0].tasks == 0  # both kept


@pytest.mark.parametrize("spin", [None, "0"])
def test_single_thread_split_needs_a_margin(spin, monkeypatch):
    """A tasks=1 candidate wins only by SPLIT_MARGIN, with spinning workers and without
    (TVM_THREAD_POOL_SPIN_COUNT=0, bench/kernels.py's regime)."""
    from shiftadd.schedules import lut_avx2 as L
    from shiftadd.tuning.search import SPLIT_MARGIN, pick

    cands = [L.Knobs(1, 1, 0), L.Knobs(1, 2, 0), L.Knobs(1, 1, 1)]
    close = {"m1r1t0": 0.0110, "m1r2t0": 0.0105, "m1r1t1": 0.0100}
    far = {**close, "m1r1t1": 0.0105 / (1 + SPLIT_MARGIN) * 0.99}
    if spin is None:
        monkeypatch.delenv("TVM_THREAD_POOL_SPIN_COUNT", raising=False)
    else:
        monkeypatch.setenv("TVM_THREAD_POOL_SPIN_COUNT", spin)
    assert pick(close, cands) == "m1r2t0" and pick(far, cands) == "m1r1t1"
    assert pick({"m1r1t0": 0.02, "m1r1t1": 0.03}, cands) == "m1r1t0"


def test_knobs_timed_under_a_kernel_switch_are_not_used_without_it(tmp_path, monkeypatch):
    """SHIFTADD_NO_AVX512 / SHIFTADD_NO_INT8 change which path runs, so the tuning context records
    them: a database tuned under a switch is ignored (with a warning) without it, and vice versa."""
    monkeypatch.setenv("SHIFTADD_NO_AVX512", "1")
    db = TuningDB.open(tmp_path / "t.json")
    db.put(
        key_of(64, 32, 2, 32, True, 1),
        {"decode": {"mt": 1, "rbk": 2, "tasks": 0}, "batch": {"mt": 2, "rbk": 1, "tasks": 0}, "ms": {}},
    )
    assert TuningDB.open(tmp_path / "t.json").get(64, 32, 2, 32, True, 1) is not None
    monkeypatch.setenv("SHIFTADD_NO_AVX512", "0")  # read as unset, as the micro-kernel reads it
    with pytest.warns(UserWarning, match=r"another context \(cpu differ\)"):
        assert TuningDB.open(tmp_path / "t.json").get(64, 32, 2, 32, True, 1) is None
    monkeypatch.delenv("SHIFTADD_NO_AVX512")
    monkeypatch.setenv("SHIFTADD_NO_INT8", "1")
    with pytest.warns(UserWarning, match=r"another context"):
        assert TuningDB.open(tmp_path / "t.json").get(64, 32, 2, 32, True, 1) is None
    from shiftadd.schedules.targets import resolve_target

    assert "SHIFTADD_NO_INT8" in TuningDB.open(tmp_path / "u.json", target=resolve_target("cpu")).ctx["cpu"]


def test_untuned_batch_knobs_follow_the_target(tmp_path, monkeypatch):
    """Without a database entry the batch takes the int8 path, except on a target without VNNI: there
    the LUT loop (one row block per pass at M = 1) unless the weights have 4 untied planes (the
    tuner's picks on an AVX2-only CPU): SHIFTADD_NO_AVX512 is such a target here. (The rule,
    without the databases shipped for known CPUs.)"""
    from shiftadd.tuning import database as D

    monkeypatch.setattr(D, "SHIPPED", tmp_path / "none")
    vnni = TuningDB.open(tmp_path / "a.json").vnni
    if vnni:
        assert all(
            TuningDB.open(tmp_path / "a.json").knobs(64, 32, b, 32, True, 1)[1] == lut_avx2.DEFAULT_BATCH_KNOBS
            for b in (2, 3, 4)
        )
    monkeypatch.setenv("SHIFTADD_NO_AVX512", "1")
    db = TuningDB.open(tmp_path / "b.json")
    assert not db.vnni
    lut, int8 = (lut_avx2.AVX2_KNOBS, lut_avx2.LUT_BATCH_KNOBS), (lut_avx2.AVX2_KNOBS, lut_avx2.DEFAULT_BATCH_KNOBS)
    assert [db.knobs(64, 32, b, 32, True, 1) for b in (2, 3, 4)] == [lut, lut, int8]
    assert db.knobs(64, 32, 4, 32, True, 1, tied=True) == lut


def test_shipped_databases_are_current():
    """A shipped database's entries apply only in their exact context: one left behind by a kernel
    or knob-grid change would silently stop applying, so it must be re-tuned (or removed) with it."""
    import tvm

    from shiftadd.tuning import database as D

    files = sorted(D.SHIPPED.glob("*.json"))
    assert files, "no shipped tuning database"
    now = D.context()
    for f in files:
        ctx = json.loads(f.read_text())["context"]
        assert (ctx["version"], ctx["kernel"], ctx["tvm"]) == (D.VERSION, now["kernel"], tvm.__version__), (
            f"{f.name} was tuned for another micro-kernel or grid: re-tune it with `shiftadd tune` (docs/USAGE.md)"
        )


def test_shipped_knobs_fill_what_the_database_lacks(tmp_path, monkeypatch):
    """Order: the user's database, then the database shipped for this context, then the shipped
    file's most frequent winners per phase (for kernels tuned nowhere)."""
    from shiftadd.tuning import database as D

    ctx = D.context()
    win = {"decode": {"mt": 1, "rbk": 2, "tasks": 1, "path": 0}, "batch": {"mt": 2, "rbk": 1, "tasks": 1, "path": 0}}
    other = {"decode": {"mt": 2, "rbk": 1, "tasks": 0, "path": 0}, "batch": win["batch"]}
    entries = {
        key_of(64, 96, 3, 32, True, 1): win,
        key_of(96, 64, 3, 32, True, 1): win,
        key_of(64, 64, 3, 32, True, 1): other,
    }
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "here.json").write_text(json.dumps({"context": ctx, "entries": entries}))
    (shipped / "elsewhere.json").write_text(json.dumps({"context": {**ctx, "cpu": "another"}, "entries": {}}))
    monkeypatch.setattr(D, "SHIPPED", shipped)
    db = TuningDB.open(tmp_path / "user.json")
    assert db.shipped_from == "here.json" and db.get(64, 96, 3, 32, True, 1) is None
    as_knobs = (lut_avx2.Knobs(**win["decode"]), lut_avx2.Knobs(**win["batch"]))
    assert db.get_shipped(64, 96, 3, 32, True, 1) == as_knobs == db.knobs(64, 96, 3, 32, True, 1)
    assert db.knobs(64, 64, 3, 32, True, 1) == (lut_avx2.Knobs(**other["decode"]), as_knobs[1])
    assert db.knobs(128, 128, 3, 32, True, 1) == as_knobs  # tuned nowhere: the most frequent winners
    mine = (lut_avx2.Knobs(4, 1, 0), lut_avx2.Knobs(1, 1, 0))
    for phase, kn in zip(("decode", "batch"), mine):
        db.put_phase(key_of(64, 96, 3, 32, True, 1), phase, kn, {}, "local")
    assert db.knobs(64, 96, 3, 32, True, 1) == mine
    monkeypatch.setattr(D, "SHIPPED", tmp_path / "none")
    bare = TuningDB.open(tmp_path / "other.json")
    assert bare.shipped == {} and bare.knobs(128, 128, 3, 32, True, 1) == lut_avx2.default_knobs(3, bare.vnni)
