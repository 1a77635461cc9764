"""MetaSchedule for the float operators (issue 6): ``shiftadd tune`` tunes the static float operators of
the module compile builds, resumes without re-measuring, ``compile --db`` applies the records (and
the result still computes the same logits), and another context's records are never read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shiftadd.relax_passes.pipeline import attention_kernels, lower

from .conftest import _tiny

MIN_WORK = 1000  # the tiny model's float lm_head (72 x 96) is below the default threshold


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(folder of the tiny Llama, database folder, tune() summary) after one MetaSchedule job."""
    from shiftadd.tuning.jobs import tune

    root = tmp_path_factory.mktemp("ftune")
    folder = root / "llama"
    _tiny("llama").save_pretrained(folder)
    db = root / "db"
    s = tune(str(folder), "q3", db=db, bits=3, group=36, rounds=2, float_trials=3, float_min_work=MIN_WORK)
    return str(folder), db, s


def _records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "database_tuning_record.json").read_text().splitlines()]


def test_tune_float_operators_and_resume(tuned):
    """Every static float operator over the threshold (here the decode_one lm_head) gets our default
    schedule plus MetaSchedule's trials as records; a rerun measures nothing again."""
    from shiftadd.tuning.jobs import tune

    folder, db, s = tuned
    f = s["float"]
    assert f["tasks"] >= 1 and f["done"] == f["tasks"] and f["left"] == 0
    (ctx,) = list((db / "tuning-metaschedule").iterdir())
    recs = _records(ctx)
    assert len(recs) >= 1 + f["tasks"]  # at least the baseline and one trial per task
    assert all(all(v > 0 for v in r[1][1]) for r in recs)  # measured run seconds
    again = tune(folder, "q3", db=db, bits=3, group=36, rounds=2, float_trials=3, float_min_work=MIN_WORK)["float"]
    assert again["done"] == 0 and again["complete_before"] == f["tasks"]
    assert _records(ctx) == recs


def test_compile_applies_the_records_and_stays_exact(tuned, tmp_path):
    """compile --db: the tuned operator's PrimFunc is MetaSchedule's best record (not the default
    schedule), and decode_one (which runs it) still equals decode (which does not) to 1e-5."""
    import shiftadd
    from shiftadd.schedules.targets import resolve_target
    from shiftadd.tuning import metaschedule as F
    from shiftadd.tuning.jobs import model_module

    folder, db, _ = tuned
    from shiftadd.quant import BCQConfig

    tgt = resolve_target("cpu")
    _, _, mod = model_module(folder, BCQConfig(bits=3, group=36), ("lm_head",), tgt)
    low = lower(mod, tgt)
    names = [t.task_name for t in F.tunable_tasks(low, tgt, MIN_WORK)]
    applied = F.apply_float(low, tgt, db)
    import tvm_ffi

    for name in names:
        assert "tirx.is_scheduled" in applied[name].attrs
        assert not tvm_ffi.structural_equal(applied[name], low[name])
    res = shiftadd.compile(folder, tmp_path / "t.so", "q3", bits=3, group=36, windows=0, db=db)
    sess = shiftadd.load(res.so)
    ids = np.asarray([[3, 1, 4, 1, 5]], np.int64)
    _, *past = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    feed = {
        "input_ids": np.asarray([[9]], np.int64),
        "attention_mask": np.ones((1, 6), np.int64),
        **dict(zip(sess.kv_cache["inputs"], past)),
    }
    want = sess.run(["logits"], feed, function="decode")[0]
    got = sess.run(["logits"], feed, function="decode_one")[0]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_records_of_another_context_are_not_read(tuned, monkeypatch):
    """Another thread count (or TVM version, or CPU) is another folder: nothing is applied."""
    from shiftadd.schedules.targets import resolve_target
    from shiftadd.tuning import metaschedule as F

    _, db, _ = tuned
    tgt = resolve_target("cpu")
    here = F.work_dir(db, tgt)
    monkeypatch.setenv("TVM_NUM_THREADS", "7")
    assert F.work_dir(db, tgt) != here and not F.work_dir(db, tgt).exists()
    monkeypatch.setattr(F, "VERSION", F.VERSION + 1)
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    assert F.work_dir(db, tgt) != here


def test_float_budget_is_respected(tuned, tmp_path):
    """With less time left than one MetaSchedule trial takes, no task starts: all are reported left."""
    from shiftadd.quant import BCQConfig
    from shiftadd.schedules.targets import resolve_target
    from shiftadd.tuning import metaschedule as F
    from shiftadd.tuning.jobs import model_module

    folder, _, _ = tuned
    tgt = resolve_target("cpu")
    _, _, mod = model_module(folder, BCQConfig(bits=3, group=36), ("lm_head",), tgt)
    s = F.tune_float(lower(mod, tgt), tgt, tmp_path / "db", budget_s=1.0, trials=3, min_work=MIN_WORK)
    assert s["done"] == 0 and s["left"] == s["tasks"] >= 1  # no trial started: nothing timed, nothing stored
    assert not any(p.read_text() for p in (tmp_path / "db").rglob("database_tuning_record.json"))


def test_attention_knobs_are_tuned_and_applied(tuned, tmp_path):
    """The tune job searched every attention kernel's knob (every candidate timed at every cache
    length); compile --db builds the kernels with the database's knobs and stays exact."""
    import shutil

    import shiftadd
    from shiftadd.quant import BCQConfig
    from shiftadd.schedules.attention_cpu import PROMPT, AttentionKernel, candidates, timing_cases
    from shiftadd.schedules.targets import resolve_target
    from shiftadd.tuning.database import TuningDB, attention_key
    from shiftadd.tuning.jobs import model_module

    folder, db, s = tuned
    tgt = resolve_target("cpu")
    _, _, mod = model_module(folder, BCQConfig(bits=3, group=36), ("lm_head",), tgt)
    kernels = attention_kernels(mod)
    scores, values = AttentionKernel("scores", 2, 18, "float32"), AttentionKernel("values", 2, 18, "float32")
    assert {scores, values} < set(kernels)  # 2 key/value heads after sharing, head size 72 / 4
    assert {k.kind for k in kernels} == {"scores", "values", "softmax"}
    assert kernels[scores] == kernels[values] == [PROMPT, 2]  # prefill/decode rows symbolic; decode_one 2 per kv head
    assert s["attention"]["done"] == len(kernels) and s["attention"]["left"] == 0
    tdb = TuningDB.open(db)
    for spec in kernels:
        e = tdb.entries[attention_key(spec)]
        assert e["knob"] in candidates(spec) and set(e["ms"]) == {str(b) for b in candidates(spec)}
        cases = {f"{m},{n}" for m, n in timing_cases(e["rows"])}
        assert all(set(v) == cases and min(v.values()) > 0 for v in e["ms"].values())
    other = tmp_path / "db"  # force non-default knobs: compile must build those, and stay exact
    shutil.copytree(db, other)
    tdb = TuningDB.open(other)
    forced = {scores: 4, values: 9}
    for spec in kernels:
        if spec.kind == "softmax":
            forced[spec] = 3
    for spec, knob in forced.items():
        tdb.put(attention_key(spec), {**tdb.entries[attention_key(spec)], "knob": knob})
    low = lower(mod, tgt, attention_knob=TuningDB.open(other).attention_knob)
    names = {gv.name_hint for gv, _ in low.functions_items()}
    assert {f"{spec.name}_k{knob}" for spec, knob in forced.items()} <= names
    res = shiftadd.compile(folder, tmp_path / "b4.so", "q3", bits=3, group=36, windows=0, db=other)
    sess = shiftadd.load(res.so)
    ids = np.asarray([[3, 1, 4, 1, 5, 9, 2]], np.int64)
    _, *past = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    feed = {
        "input_ids": np.asarray([[6]], np.int64),
        "attention_mask": np.ones((1, 8), np.int64),
        **dict(zip(sess.kv_cache["inputs"], past)),
    }
    full = np.concatenate([ids, [[6]]], 1)
    want = sess.run(["logits"], {"input_ids": full, "attention_mask": np.ones_like(full)})[0][:, -1:]
    got = sess.run(["logits"], feed, function="decode_one")[0]
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
