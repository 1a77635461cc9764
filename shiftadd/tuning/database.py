"""Tuning the AVX2 LUT kernel's knobs on this machine, and the database ``compile`` reads them from.

A small grid on the real machine (T-MAC's approach: no cost model), per kernel key (K, N, bits,
group, offset, rows per scale): the decode knobs are timed at M = 1 and the batch knobs at
M = ``BATCH_M``. Entries live in one JSON file under a context (TVM version, CPU name and features,
hash of the micro-kernel source and of this grid): entries from another context are never applied
(they are reported once and ignored), so a stale database can only cost speed, never correctness.
Writes are atomic (temp file + rename) after every kernel, so an interrupted tuning keeps what it
measured.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..util import atomic_path, log
from . import lut_avx2 as L
from .timing import copies_for, interleaved, median_ms

BATCH_M = 32
PHASES = {"decode": 1, "batch": BATCH_M}  # phase -> activation rows it is timed at
VERSION = 4  # 4: keys carry the thread pool's spin regime (entries of 3 mixed them)


def default_path() -> Path:
    env = os.environ.get("SHIFTADD_TUNING_DB")
    return Path(env) if env else Path.home() / ".cache" / "shiftadd" / "tuning.json"


def context(target=None) -> dict:
    """What an entry is only valid for: the target's CPU model (LLVM ``mcpu``) and the kernel's
    features on it, the TVM version, the micro-kernel source and knob grid, and threads. (The thread
    pool's spin setting was part of it, but a SmolLM2 compile after a tuning job in one process saw a
    different value and ignored the whole database; it changes which knobs win, never correctness.)
    ``target``: a TVM Target or spec ('cpu' = this machine, the default; for RPC tuning, the remote's)."""
    import tvm
    from tvm.target import codegen

    from ..targets import resolve_target

    tgt = resolve_target(target or "cpu") if target is None or isinstance(target, str) else target
    mcpu = str(tgt.attrs.get("mcpu", "generic"))
    try:
        feats = ",".join(f for f in L.FEATURES + L.AVX512_FEATURES if codegen.target_has_features([f], tgt))
    except Exception:  # noqa: BLE001 - not an x86 target
        feats = ""
    src = hashlib.sha256(L.SOURCE.read_bytes() + repr(L.KNOB_SPACE).encode()).hexdigest()[:16]
    # this process's kernel switches change which path runs (for an RPC target: the tuning job's own)
    feats += "".join(f"; {v}" for v in L.SWITCHES if L.switch_on(v))
    return {"version": VERSION, "tvm": tvm.__version__, "cpu": f"{mcpu}; {feats}", "kernel": src,
            "threads": int(os.environ.get("TVM_NUM_THREADS", "0") or 0)}


def spin_regime() -> str:
    """The TVM thread pool's waiting regime this process runs in, as part of every key: with
    ``TVM_THREAD_POOL_SPIN_COUNT=0`` (bench/kernels.py, fair to the other runtimes' pools) an idle
    worker sleeps and a two-thread call pays its wake-up, so one thread wins for small kernels;
    with the default spinning (the runtime, a decode step) two threads win (576x960 3-bit: 10.7
    vs 17.6 us). Knobs from one regime were 1.5-2.8x slower in the other, so each keeps its own."""
    v = os.environ.get("TVM_THREAD_POOL_SPIN_COUNT", "").strip()
    return "" if not v else f" spin{v}"


def key_of(k: int, n: int, bits: int, group: int, offset: bool, rows: int, fp8: bool = False,
           tied: bool = False) -> str:
    """A kernel's database key. The scale storage is part of it (float16 keys keep their old form):
    e5m2 bytes and tied scales run other loops (tied 4-bit reads row-interleaved codes), so each is
    timed as itself."""
    fmt = (" e5m2" if fp8 else "") + (" tied" if tied else "")
    return f"lut8 k{k} n{n} q{bits} g{group} z{int(bool(offset))} r{rows}{fmt}{spin_regime()}"


def kernel_args(kk: tuple) -> tuple:
    """A key tuple (k, n, bits, group, offset, rows[, fp8[, tied]]) in full: the 8 arguments of
    lut_avx2.make_lut_avx2 / random_packed that shape the kernel."""
    return (*kk, False, False)[:8] if len(kk) < 8 else tuple(kk)


def attention_key(spec) -> str:
    """Key of an attention kernel's knob (an AttentionKernel of schedules/attention_cpu.py; the
    file's source hash is in the key, so an entry for an older kernel is never applied)."""
    from .attention_cpu import SOURCE_HASH

    mask = f" mask{spec.bias}" if spec.bias else ""
    return f"{spec.kind} h{spec.heads} d{spec.d} {spec.dtype}{mask} src{SOURCE_HASH}{spin_regime()}"


class TuningDB:
    """``{"context": {...}, "entries": {key: {"decode": knobs, "batch": knobs, "ms": {...}}}}``."""

    def __init__(self, path: Path, data: dict | None = None, target=None):
        self.path = Path(path)
        self.ctx = context(target)
        # the int8 path runs on VNNI for this target (else on AVX2, where the untuned defaults differ)
        self.vnni = "avx512vnni" in self.ctx["cpu"] and "SHIFTADD_NO_AVX512" not in self.ctx["cpu"]
        self.entries: dict = {}
        self.stale = 0
        if data:
            if data.get("context") == self.ctx:
                self.entries = dict(data.get("entries", {}))
            else:
                self.stale = len(data.get("entries", {}))
                diff = sorted(k for k in set(self.ctx) | set(data.get("context", {}))
                              if self.ctx.get(k) != data.get("context", {}).get(k))
                warnings.warn(f"tuning database {self.path}: {self.stale} entries were tuned for another "
                              f"context ({', '.join(diff)} differ); ignoring them", stacklevel=3)

    @classmethod
    def open(cls, path: str | os.PathLike | None = None, target=None) -> "TuningDB":
        """The database at ``path`` (a file, or a folder holding ``tuning.json``) for ``target``."""
        p = Path(path) if path else default_path()
        if p.is_dir() or (path and not p.suffix):
            p = p / "tuning.json"
        if p.exists() and not p.is_file():
            raise ValueError(f"tuning database {p}: not a file")
        if not p.exists():
            return cls(p, target=target)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"tuning database {p}: not readable JSON ({e}); delete it or pass another --db") from None
        if not isinstance(data, dict) or not isinstance(data.get("entries", {}), dict):
            raise ValueError(f"tuning database {p}: expected an object with 'context' and 'entries'")
        return cls(p, data, target=target)

    def get(self, k, n, bits, group, offset, rows, fp8=False, tied=False) -> tuple[L.Knobs, L.Knobs] | None:
        """(decode, batch) knobs of a fully tuned kernel, else None."""
        e = self.entries.get(key_of(k, n, bits, group, offset, rows, fp8, tied))
        if e is None or any(ph not in e for ph in PHASES):
            return None
        return L.Knobs(**e["decode"]), L.Knobs(**e["batch"])

    def has_phase(self, key: str, phase: str) -> bool:
        return phase in self.entries.get(key, {})

    def put_phase(self, key: str, phase: str, knobs: L.Knobs, ms: dict, measured_by: str) -> None:
        """Record one phase (decode: M = 1, batch: M = BATCH_M) of a kernel and save at once."""
        e = self.entries.setdefault(key, {"ms": {}})
        e[phase] = asdict(knobs)
        e["ms"][phase] = ms
        e.setdefault("measured_by", {})[phase] = measured_by
        self.save()

    def knobs(self, k, n, bits, group, offset, rows, fp8=False, tied=False, int8: bool = True) -> tuple[L.Knobs, L.Knobs]:
        """(decode, batch) knobs, tuned or the defaults for this target (lut_avx2.default_knobs).
        ``int8`` False keeps M > 1 on the LUT path (the decode kernel's arithmetic at every M): a
        batch pick on the int8 path is replaced by the fastest LUT candidate this entry timed, else
        LUT_BATCH_KNOBS."""
        dec, bat = self.get(k, n, bits, group, offset, rows, fp8, tied) or L.default_knobs(bits, self.vnni)
        if not int8 and bat.path == 1:
            ms = self.entries.get(key_of(k, n, bits, group, offset, rows, fp8, tied), {}).get("ms", {}).get("batch", {})
            lut = {kn.tag(): kn for kn in L.KNOB_SPACE if kn.path != 1 and kn.tag() in ms}
            bat = lut[min(lut, key=ms.get)] if lut else L.LUT_BATCH_KNOBS
        return dec, bat

    def attention_knob(self, spec) -> int | None:
        """The tuned knob of an attention kernel (AttentionKernel), or None (untuned: the default)."""
        knob = self.entries.get(attention_key(spec), {}).get("knob")
        return int(knob) if isinstance(knob, int) else None  # an entry without one: untuned

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = entry
        self.save()

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"context": self.ctx, "entries": self.entries}, indent=1, sort_keys=True))


def candidates(m: int, paths=frozenset({0})) -> list[L.Knobs]:
    """The knobs timed at ``m`` activation rows, of the ``paths`` the machine runs (Knobs.path). The
    int8 path only for M > 1 (at M = 1 dequantising a panel for one row costs more than the LUT steps
    it replaces); for M > 1 the 512-bit LUT path only with 4 row blocks per pass."""
    def ok(kn):
        return kn.path in paths
    if m == 1:  # activation-row tiling does nothing for one row
        return [kn for kn in L.KNOB_SPACE if ok(kn) and kn.mt == 1 and kn.path != 1]
    return [kn for kn in L.KNOB_SPACE
            if ok(kn) and (kn.path == 1 or (kn.path == 2 and kn.rbk == 4)
                           or (kn.path == 0 and kn.rbk <= 4 and (kn.mt > 1 or kn.rbk == 4)))]


class LocalMeasurer:
    """Times candidates in this process: interleaved medians over cold copies of random weights."""

    name = "local"

    def __init__(self, cold_mib: int = 64, rounds: int = 5, seed: int = 0):
        self.cold_mib, self.rounds, self.seed = cold_mib, rounds, seed

    @property
    def paths(self) -> frozenset[int]:
        """The kernel paths this machine takes (a candidate only where it runs)."""
        return L.active_paths()

    def measure(self, kk: tuple, m: int, cands: list[L.Knobs], deadline: float | None = None) -> dict[str, float]:
        import tvm

        from ..targets import resolve_target

        L.load_in_process()
        rng = np.random.default_rng(self.seed)
        k, n, bits, group, offset, rows, fp8, tied = kernel_args(kk)
        packed = L.random_packed(k, n, bits, group, offset, rows, fp8, rng=rng, tied=tied)
        nbytes = sum(a.nbytes for a in packed)
        ncopies = copies_for(nbytes, self.cold_mib * 2**20, 16)
        target = resolve_target("cpu")
        x = tvm.runtime.tensor(rng.standard_normal((m, kk[0]), dtype=np.float32))
        y = tvm.runtime.empty((m, kk[1]), "float32")
        fns = {}
        for kn in cands:
            fn = tvm.compile(tvm.IRModule({"main": L.make_lut_avx2(k, n, bits, group, offset, rows, kn, kn, fp8, tied)}),
                             target)["main"]
            # copies of its own per candidate, as bench/kernels.py does: shared copies stay in a large L3
            # (260 MB here) between candidates, and knobs picked on cached weights ran ~10 % slower cold
            # (4096x11008 4-bit M = 1: wm1r1t0 won on cached weights, wm1r2t0 is 11 % faster cold)
            copies = [[tvm.runtime.tensor(a) for a in packed] for _ in range(ncopies)]
            fns[kn.tag()] = [(lambda fn=fn, p=p: fn(x, *p, y)) for p in copies]
        try:
            times = interleaved(fns, rounds=self.rounds if m == 1 else max(2, self.rounds // 2), deadline=deadline)
        finally:  # ~1 GB of copies per call: free them now (reference cycles would hold them to the next gc)
            fns.clear()
            gc.collect()
        return {t: median_ms(v) for t, v in times.items()}


SPLIT_MARGIN = 0.15  # a single-thread pick must beat the best all-threads one by this much


def pick(ms: dict[str, float], cands: list[L.Knobs]) -> str:
    """The tag of the fastest candidate, except that a single-thread split (tasks = 1) is kept only
    when it beats the fastest all-threads candidate by SPLIT_MARGIN. Why: on this shared 2-vCPU
    machine the split's ranking flips with the other vCPU's load from one tuning to the next
    (576x960 3-bit, three tunings in one process: 0.016 ms t1, 0.010 t0, 0.013 t0); a single-thread
    kernel in a decode step, where both workers spin, gives away the second core; and without
    spinning (bench/kernels.py), where one thread rightly wins small kernels by its saved wake-up,
    an 11008x4096 GEMV picked one thread on a 5 % edge and then ran 1.7x slower than its neighbours."""
    best = min(ms, key=ms.get)
    tasks = {c.tag(): c.tasks for c in cands}
    if tasks.get(best) != 1:
        return best
    pool = [t for t in ms if tasks.get(t) == 0]
    alt = min(pool, key=ms.get) if pool else None
    return alt if alt is not None and ms[alt] <= ms[best] * (1 + SPLIT_MARGIN) else best


def tune_phases(db: TuningDB, keys: list[tuple], measurer=None, budget_s: float | None = None,
                progress=log) -> dict:
    """Tune every (kernel, phase) missing from ``db``, saving after each, until done or ``budget_s``
    runs out. A phase is started only while its estimated time (the mean of the phases before it,
    per candidate) fits in what is left, and its timing loop stops at the deadline, so the budget
    holds to about one timing round. Returns a summary (phases done, left, seconds)."""
    measurer = measurer or LocalMeasurer()
    t0 = time.perf_counter()
    deadline = None if budget_s is None else t0 + budget_s
    todo = [(kk, ph) for kk in dict.fromkeys(keys) for ph in PHASES if not db.has_phase(key_of(*kk), ph)]
    done, per_cand = 0, []
    for i, (kk, ph) in enumerate(todo, 1):
        cands = candidates(PHASES[ph], getattr(measurer, "paths", frozenset({0})))
        left = None if deadline is None else deadline - time.perf_counter()
        if left is not None and (left <= 0 or (per_cand and np.mean(per_cand) * len(cands) > left)):
            break
        ts = time.perf_counter()
        ms = measurer.measure(kk, PHASES[ph], cands, deadline)
        per_cand.append((time.perf_counter() - ts) / len(cands))
        best = pick(ms, cands)
        db.put_phase(key_of(*kk), ph, next(c for c in cands if c.tag() == best), ms, measurer.name)
        done += 1
        left = "" if deadline is None else f", {max(0.0, deadline - time.perf_counter()):.0f} s left"
        progress(f"tuned {i}/{len(todo)} {key_of(*kk)} {ph}: best {best} {ms[best]:.3f} ms "
                 f"(of {len(ms)}; worst {max(ms.values()):.3f} ms){left}")
    return {"phases_done": done, "phases_left": len(todo) - done, "seconds": time.perf_counter() - t0,
            "kernels": len(dict.fromkeys(keys))}


def tune_missing(db: TuningDB, keys: list[tuple], **kw) -> int:
    """Tune every kernel key not yet complete in ``db`` (no budget); returns how many were tuned."""
    todo = [kk for kk in dict.fromkeys(keys) if db.get(*kk) is None]
    tune_phases(db, todo, LocalMeasurer(**kw))
    return sum(db.get(*kk) is not None for kk in todo)


def tune_attention(db: TuningDB, kernels: dict, budget_s: float | None = None, rounds: int = 30,
                   measurer=None, progress=log) -> dict:
    """Search the knob of every attention kernel (``{AttentionKernel: query rows}``,
    float_tuning.attention_kernels) missing from ``db``, saving each at once; a kernel is started
    only while the time the last one took fits in ``budget_s``; ``rounds`` of interleaved timing
    here, or on the RPC servers of ``measurer`` (an RPCMeasurer). Returns (done, left, seconds)."""
    from .attention_cpu import KINDS, measure

    t0 = time.perf_counter()
    todo = [(k, rows) for k, rows in kernels.items() if db.attention_knob(k) is None]
    done, took = 0, 0.0
    for i, (spec, rows) in enumerate(todo, 1):
        if budget_s is not None and (time.perf_counter() - t0) + took > budget_s:
            break
        ts = time.perf_counter()
        best, ms = measure(spec, rows, rounds=rounds, timer=measurer.time_attention if measurer else None)
        took = time.perf_counter() - ts
        db.put(attention_key(spec), {"knob": best, "ms": {str(b): v for b, v in ms.items()}, "rows": list(rows),
                                     "measured_by": measurer.name if measurer else "local"})
        done += 1
        worst = max(ms, key=lambda b: sum(ms[b].values()))
        knob = KINDS[spec.kind][0]
        progress(f"tuned attention {i}/{len(todo)} {spec.name}: {knob} {best} "
                 f"({', '.join(f'{c} {v:.4f} ms' for c, v in ms[best].items())}; worst {knob} {worst}: "
                 f"{', '.join(f'{v:.4f}' for v in ms[worst].values())}) in {took:.1f} s")
    return {"done": done, "left": len(todo) - done, "seconds": time.perf_counter() - t0}
