"""``shiftadd tune``: the kernels a model needs, a time budget, resume after an interruption, databases
of other targets ignored, measurement over TVM RPC (a tracker and two servers on loopback), and
clear errors for bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings

import pytest

from shiftadd.schedules import lut_avx2 as L
from shiftadd.tuning.database import PHASES, TuningDB, key_of
from shiftadd.tuning.jobs import kernel_keys, model_matmuls, parse_budget, tune
from shiftadd.tuning.search import LocalMeasurer

from .conftest import _tiny, free_port

pytestmark = pytest.mark.skipif(
    not L.target_supported(__import__("shiftadd.schedules.targets", fromlist=["x"]).resolve_target("cpu")),
    reason="the tunable kernel needs AVX2",
)


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory):
    """Tiny OPT: matmuls 64x64 (q, k, v, out), 64x96 (fc1), 96x64 (fc2): 3 kernels at group 32."""
    root = tmp_path_factory.mktemp("tune") / "opt"
    _tiny("opt").save_pretrained(root)
    return str(root)


def _spy(monkeypatch, delay: float = 0.0):
    """Record every (kernel, M) measured; ``delay`` seconds more per phase (so that a budget cannot
    hold every phase however fast this machine is today)."""
    calls = []
    real = LocalMeasurer.measure

    def measure(self, kk, m, cands, deadline=None):
        calls.append((kk, m))
        time.sleep(delay)
        return real(self, kk, m, cands, deadline)

    monkeypatch.setattr(LocalMeasurer, "measure", measure)
    return calls


def test_parse_budget():
    assert parse_budget("20m") == 1200 and parse_budget("90s") == 90 and parse_budget("1h30m") == 5400
    assert parse_budget("45") == 45 and parse_budget(None) is None
    for bad in ("abc", "0", "-5m", "5 minutes"):
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(bad)


def test_kernel_keys_are_what_compile_looks_up(opt_folder, tmp_path):
    """The tuner's keys are exactly the compile's lookups: after tuning, compile finds every kernel."""
    import shiftadd
    from shiftadd.quant import BCQConfig

    shapes, siblings = model_matmuls(opt_folder)
    assert [len(g) for g in siblings] == [3, 3]  # q/k/v of both layers
    keys = kernel_keys(shapes, BCQConfig(bits=3, group=32), siblings=siblings)
    assert sorted(keys) == sorted(
        [
            (64, 64, 3, 32, True, 1, False, False),
            (64, 96, 3, 32, True, 1, False, False),
            (96, 64, 3, 32, True, 1, False, False),
            (64, 192, 3, 32, True, 1, False, False),
        ]
    )  # + q/k/v stacked
    db = tmp_path / "db"
    db.mkdir()
    s = tune(opt_folder, "q3", db=db, bits=3, group=32, rounds=2, float_ops=False)
    assert s["complete"] == s["kernels"] == 4 and s["phases_left"] == 0
    res = shiftadd.compile(opt_folder, tmp_path / "m.so", "q3", bits=3, group=32, windows=0, db=db)
    t = res.manifest["tuning"]
    assert t["default"] == 0 and t["from_db"] == 4 and t["db"] == str(db / "tuning.json")


def test_scale_storage_is_part_of_the_key(opt_folder, tmp_path, monkeypatch):
    """e5m2 and tied scales run other loops (tied 4-bit reads row-interleaved codes), so they are
    tuned as themselves under keys of their own: the tuner times the kernel of that storage (its
    packed weights and code layout), float16 keys keep their old form, and a compile with the same
    storage finds every kernel it needs."""
    import shiftadd

    calls = _spy(monkeypatch)
    made = []
    real = L.make_lut_avx2
    monkeypatch.setattr(L, "make_lut_avx2", lambda *a, **kw: made.append(a) or real(*a, **kw))
    assert key_of(64, 64, 4, 32, True, 1) == key_of(64, 64, 4, 32, True, 1, False, False)
    assert len({key_of(64, 64, 4, 32, True, 1, f, t) for f in (False, True) for t in (False, True)}) == 4
    db = tmp_path / "db"
    s = tune(opt_folder, "q3", db=db, bits=4, group=32, rounds=1, float_ops=False, scale_format="e5m2", tied=True)
    assert s["complete"] == s["kernels"] == 4
    assert calls and all(kk[6:] == (True, True) for kk, _ in calls)
    assert made and all(a[8:] == (True, True) for a in made)  # make_lut_avx2(..., fp8, tied) as the compile builds it
    entries = json.loads((db / "tuning.json").read_text())["entries"]
    assert all(" e5m2 tied" in k for k in entries)
    res = shiftadd.compile(
        opt_folder, tmp_path / "m.so", "q3", bits=4, group=32, windows=0, db=db, scale_format="e5m2", tied=True
    )
    assert res.manifest["tuning"]["from_db"] == 4 and res.manifest["tuning"]["default"] == 0
    plain = shiftadd.compile(opt_folder, tmp_path / "p.so", "q3", bits=4, group=32, windows=0, db=db)
    assert plain.manifest["tuning"]["from_db"] == 0 and plain.manifest["tuning"]["default"] == 4


def test_budget_is_respected_and_rerun_resumes(opt_folder, tmp_path, monkeypatch):
    calls = _spy(monkeypatch, delay=1.0)
    starts = []  # when each phase began: the tuner starts none past its budget, however slow this machine
    real = LocalMeasurer.measure
    monkeypatch.setattr(
        LocalMeasurer, "measure", lambda *a, **k: (starts.append(time.perf_counter() - t0), real(*a, **k))[1]
    )
    db = tmp_path / "t.json"
    t0 = time.perf_counter()
    s1 = tune(opt_folder, "q3", db=db, bits=2, group=32, budget=6, rounds=2, float_ops=False)
    assert starts and max(starts) < 6, starts
    assert s1["phases_done"] == len(calls) and 1 <= s1["phases_done"] < 8, s1
    first = json.loads(db.read_text())["entries"]
    done = {(k, ph) for k, e in first.items() for ph in PHASES if ph in e}
    calls.clear()
    s2 = tune(opt_folder, "q3", db=db, bits=2, group=32, rounds=2, float_ops=False)
    assert s2["phases_done"] == 8 - len(done) == len(calls) and s2["complete"] == 4  # 3 kernels + q/k/v stacked
    assert not {(key_of(*kk), "decode" if m == 1 else "batch") for kk, m in calls} & done  # nothing re-measured
    after = json.loads(db.read_text())["entries"]
    for k, e in first.items():  # what the first run measured is kept as it was
        for ph in PHASES:
            if ph in e:
                assert after[k][ph] == e[ph] and after[k]["ms"][ph] == e["ms"][ph]


def test_interrupted_run_keeps_every_finished_phase(opt_folder, tmp_path, monkeypatch):
    real = LocalMeasurer.measure
    n = {"calls": 0}

    def measure(self, kk, m, cands, deadline=None):
        n["calls"] += 1
        if n["calls"] == 3:
            raise KeyboardInterrupt
        return real(self, kk, m, cands, deadline)

    monkeypatch.setattr(LocalMeasurer, "measure", measure)
    db = tmp_path / "t.json"
    with pytest.raises(KeyboardInterrupt):
        tune(opt_folder, "q3", db=db, bits=4, group=32, rounds=2, float_ops=False)
    entries = json.loads(db.read_text())["entries"]
    assert sum(ph in e for e in entries.values() for ph in PHASES) == 2
    monkeypatch.setattr(LocalMeasurer, "measure", real)
    calls = _spy(monkeypatch)
    assert (
        tune(opt_folder, "q3", db=db, bits=4, group=32, rounds=2, float_ops=False)["complete"] == 4 and len(calls) == 6
    )


def test_database_of_another_target_or_tvm_is_ignored(tmp_path):
    other = '{"kind": "llvm", "mcpu": "znver3"}'
    db = TuningDB.open(tmp_path / "t.json", target=other)
    db.put_phase(key_of(64, 64, 3, 32, True, 1), "decode", L.Knobs(1, 2, 0), {"m1r2t0": 0.1}, "local")
    db.put_phase(key_of(64, 64, 3, 32, True, 1), "batch", L.Knobs(2, 1, 0), {"m2r1t0": 0.2}, "local")
    assert TuningDB.open(tmp_path / "t.json", target=other).get(64, 64, 3, 32, True, 1) is not None
    with pytest.warns(UserWarning, match=r"another context \(cpu differ"):
        here = TuningDB.open(tmp_path / "t.json")
    assert here.get(64, 64, 3, 32, True, 1) is None and here.stale == 1
    data = json.loads((tmp_path / "t.json").read_text())
    data["context"] = dict(here.ctx, tvm="0.26.0")
    (tmp_path / "t.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"tvm differ"):
        assert TuningDB.open(tmp_path / "t.json").entries == {}


def _loopback(module: str, port: int, *args: str) -> subprocess.Popen:
    """``python -m tvm.exec.<module> *args`` on 127.0.0.1, on ``port`` alone, its output discarded."""
    where = ["--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]
    return subprocess.Popen(
        [sys.executable, "-m", f"tvm.exec.{module}", *args, *where],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def rpc_tracker():
    """A TVM RPC tracker and two servers under key 'shiftadd-test' on 127.0.0.1 (each takes a few
    seconds to start: the fixture waits until the tracker lists both servers free)."""
    from tvm import rpc

    port = free_port()
    procs = [_loopback("rpc_tracker", port)]
    try:
        t0 = time.time()
        while True:
            try:
                tracker = rpc.connect_tracker("127.0.0.1", port)
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert time.time() - t0 < 90, "the RPC tracker did not start"
                time.sleep(0.5)
        for _ in range(2):
            procs.append(
                _loopback("rpc_server", free_port(), "--tracker", f"127.0.0.1:{port}", "--key", "shiftadd-test")
            )
        while tracker.summary()["queue_info"].get("shiftadd-test", {}).get("free", 0) < 2:
            assert time.time() - t0 < 120, f"RPC servers did not register: {tracker.summary()}"
            time.sleep(0.5)
        tracker.close()
        yield f"127.0.0.1:{port}"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_rpc_tuning_on_loopback(opt_folder, tmp_path, rpc_tracker):
    """Two servers measure the candidates; the entries are of the same kind as local tuning's."""
    from shiftadd.tuning.rpc import RPCMeasurer

    m = RPCMeasurer(rpc_tracker, "shiftadd-test", repeat=5)
    assert len(m.sessions) == 2
    ms = m.measure((64, 64, 3, 32, True, 1), 1, [L.Knobs(1, 1, 0), L.Knobs(1, 2, 0), L.Knobs(1, 4, 1)])
    assert set(ms) == {"m1r1t0", "m1r2t0", "m1r4t1"} and all(0 < v < 100 for v in ms.values())
    m.close()
    s = tune(
        opt_folder,
        "q3",
        db=tmp_path / "rpc.json",
        rpc=rpc_tracker,
        key="shiftadd-test",
        bits=3,
        group=32,
        repeat=5,
        float_trials=2,
        float_min_work=1000,
    )
    assert s["complete"] == 4 and s["measured_by"].startswith("rpc:shiftadd-test@127.0.0.1:")
    # MetaSchedule measured the float lm_head (64 x 96) through the same servers: baseline + trials
    f = s["float"]
    assert f["tasks"] == f["done"] >= 1 and all(v > 0 for v in f["best"].values())
    local = tune(opt_folder, "q3", db=tmp_path / "local.json", bits=3, group=32, rounds=2, float_ops=False)
    assert local["complete"] == 4
    r = json.loads((tmp_path / "rpc.json").read_text())
    lo = json.loads((tmp_path / "local.json").read_text())
    assert r["context"] == lo["context"]  # same target: interchangeable databases
    lut = {k: e for k, e in r["entries"].items() if k.startswith("lut8 ")}
    assert set(lut) == set(lo["entries"])
    # our attention kernels' knobs were searched through the servers too, with local tuning's entries
    from shiftadd.quant import BCQConfig
    from shiftadd.relax_passes.pipeline import attention_kernels
    from shiftadd.schedules.attention_cpu import candidates, timing_cases
    from shiftadd.schedules.targets import resolve_target
    from shiftadd.tuning.database import attention_key
    from shiftadd.tuning.jobs import model_module
    from shiftadd.tuning.search import measure

    assert s["attention"]["done"] == len(r["entries"]) - len(lut) >= 3
    for spec, rows in attention_kernels(
        model_module(opt_folder, BCQConfig(bits=3, group=32), ("lm_head",), resolve_target("cpu"))[2]
    ).items():
        e = r["entries"][attention_key(spec)]
        _, here = measure(spec, rows, rounds=1)
        assert e["measured_by"].startswith("rpc:") and e["knob"] in candidates(spec) and e["rows"] == rows
        assert set(e["ms"]) == {str(k) for k in here} and all(set(v) == set(here[int(k)]) for k, v in e["ms"].items())
        assert set(here[candidates(spec)[0]]) == {f"{m},{n}" for m, n in timing_cases(rows)}
    space = {kn.tag() for kn in L.KNOB_SPACE}
    for k, e in lut.items():
        for ph in PHASES:
            assert L.Knobs(**e[ph]).tag() in space and set(e["ms"][ph]) == set(lo["entries"][k]["ms"][ph])
            assert e["measured_by"][ph].startswith("rpc:") and lo["entries"][k]["measured_by"][ph] == "local"


def test_bad_arguments_get_clear_errors(opt_folder, tmp_path):
    with pytest.raises(ValueError, match="HOST:PORT"):
        tune(opt_folder, "q3", db=tmp_path / "x.json", rpc="localhost", key="k")
    with pytest.raises(ValueError, match="--key needs --rpc"):
        tune(opt_folder, "q3", db=tmp_path / "x.json", key="k")
    with pytest.raises(ValueError, match="--key"):
        tune(opt_folder, "q3", db=tmp_path / "x.json", rpc="127.0.0.1:9")
    with pytest.raises(ConnectionError, match="no TVM RPC tracker"):
        tune(opt_folder, "q3", db=tmp_path / "x.json", rpc=f"127.0.0.1:{free_port()}", key="k")
    with pytest.raises(ValueError, match="column layout"):
        tune(opt_folder, "q3", db=tmp_path / "x.json", layout="column")
    with pytest.raises(ValueError, match="--budget"):
        tune(opt_folder, "q3", db=tmp_path / "x.json", budget="soon")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not readable JSON"):
        tune(opt_folder, "q3", db=tmp_path / "bad.json")
    r = subprocess.run(
        [sys.executable, "-m", "shiftadd.cli", "tune", opt_folder, "--rpc", "nowhere", "--key", "k"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "shiftadd tune: error: --rpc: expected HOST:PORT" in r.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warnings from a plain, valid call path
        assert parse_budget("1m") == 60
