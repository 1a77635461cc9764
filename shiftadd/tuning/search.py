"""The knob search: candidates per kernel, timed on this machine (or RPC servers), the pick, and the
phases of a tuning job saved into the database as they finish."""

from __future__ import annotations

import gc
import logging
import time

import numpy as np
import tvm

from ..schedules import attention_cpu as A
from ..schedules import lut_avx2 as L
from ..schedules import lut_avx2_pack as P
from ..schedules import native as N
from ..schedules.attention_cpu import LENGTHS, AttentionKernel, arrays, kernel, timing_cases
from ..schedules.lut_spec import LUTSpec
from ..schedules.targets import resolve_target
from .database import PHASES, TuningDB, attention_key, key_of
from .timing import copies_for, interleaved, median_ms

logger = logging.getLogger(__name__)


def candidates(m: int, paths=frozenset({0})) -> list[L.Knobs]:
    """The knobs timed at ``m`` activation rows, of the ``paths`` the machine runs (Knobs.path). The
    int8 path only for M > 1 (at M = 1 dequantising a panel for one row costs more than the LUT steps
    it replaces); for M > 1 the 512-bit LUT path only with 4 row blocks per pass."""

    def ok(kn):
        return kn.path in paths

    if m == 1:  # activation-row tiling does nothing for one row
        return [kn for kn in L.KNOB_SPACE if ok(kn) and kn.mt == 1 and kn.path != 1]
    return [
        kn
        for kn in L.KNOB_SPACE
        if ok(kn)
        and (
            kn.path == 1
            or (kn.path == 2 and kn.rbk == 4)
            or (kn.path == 0 and kn.rbk <= 4 and (kn.mt > 1 or kn.rbk == 4))
        )
    ]


class LocalMeasurer:
    """Times candidates in this process: interleaved medians over cold copies of random weights."""

    name = "local"

    def __init__(self, cold_mib: int = 64, rounds: int = 5, seed: int = 0):
        self.cold_mib, self.rounds, self.seed = cold_mib, rounds, seed

    @property
    def paths(self) -> frozenset[int]:
        """The kernel paths this machine takes (a candidate only where it runs)."""
        return N.active_paths()

    def measure(self, kk: tuple, m: int, cands: list[L.Knobs], deadline: float | None = None) -> dict[str, float]:
        import tvm

        from ..schedules.targets import resolve_target

        N.load_in_process()
        rng = np.random.default_rng(self.seed)
        k, n, bits, group, offset, rows, fp8, tied = LUTSpec(*kk)
        packed = P.random_packed(LUTSpec(*kk), rng)
        nbytes = sum(a.nbytes for a in packed)
        ncopies = copies_for(nbytes, self.cold_mib * 2**20, 16)
        target = resolve_target("cpu")
        x = tvm.runtime.tensor(rng.standard_normal((m, kk[0]), dtype=np.float32))
        y = tvm.runtime.empty((m, kk[1]), "float32")
        fns = {}
        for kn in cands:
            fn = tvm.compile(
                tvm.IRModule({"main": L.make_lut_avx2(k, n, bits, group, offset, rows, kn, kn, fp8, tied)}), target
            )["main"]
            # copies of its own per candidate, as bench/kernels.py does: shared copies stay in a large L3
            # between candidates, and knobs picked on cached weights ran slower cold (docs/ENGINEERING.md)
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
    machine the split's ranking flips with the other vCPU's load from one tuning to the next; a
    single-thread kernel in a decode step, where both workers spin, gives away the second core; and
    without spinning, where one thread rightly wins small kernels by its saved wake-up, a large GEMV
    won one thread on a small edge and then ran far slower (docs/ENGINEERING.md)."""
    best = min(ms, key=ms.get)
    tasks = {c.tag(): c.tasks for c in cands}
    if tasks.get(best) != 1:
        return best
    pool = [t for t in ms if tasks.get(t) == 0]
    alt = min(pool, key=ms.get) if pool else None
    return alt if alt is not None and ms[alt] <= ms[best] * (1 + SPLIT_MARGIN) else best


def tune_phases(
    db: TuningDB, keys: list[tuple], measurer=None, budget_s: float | None = None, progress=logger.info
) -> dict:
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
        progress(
            f"tuned {i}/{len(todo)} {key_of(*kk)} {ph}: best {best} {ms[best]:.3f} ms "
            f"(of {len(ms)}; worst {max(ms.values()):.3f} ms){left}"
        )
    return {
        "phases_done": done,
        "phases_left": len(todo) - done,
        "seconds": time.perf_counter() - t0,
        "kernels": len(dict.fromkeys(keys)),
    }


def tune_missing(db: TuningDB, keys: list[tuple], **kw) -> int:
    """Tune every kernel key not yet complete in ``db`` (no budget); returns how many were tuned."""
    todo = [kk for kk in dict.fromkeys(keys) if db.get(*kk) is None]
    tune_phases(db, todo, LocalMeasurer(**kw))
    return sum(db.get(*kk) is not None for kk in todo)


def tune_attention(
    db: TuningDB, kernels: dict, budget_s: float | None = None, rounds: int = 30, measurer=None, progress=logger.info
) -> dict:
    """Search the knob of every attention kernel (``{AttentionKernel: query rows}``,
    relax_passes.pipeline.attention_kernels) missing from ``db``, saving each at once; a kernel is started
    only while the time the last one took fits in ``budget_s``; ``rounds`` of interleaved timing
    here, or on the RPC servers of ``measurer`` (an RPCMeasurer). Returns (done, left, seconds)."""
    from ..schedules.attention_cpu import KINDS

    t0 = time.perf_counter()
    todo = [(k, rows) for k, rows in kernels.items() if db.attention_knob(k) is None]
    done, took = 0, 0.0
    for i, (spec, rows) in enumerate(todo, 1):
        if budget_s is not None and (time.perf_counter() - t0) + took > budget_s:
            break
        ts = time.perf_counter()
        best, ms = measure(spec, rows, rounds=rounds, timer=measurer.time_attention if measurer else None)
        took = time.perf_counter() - ts
        db.put(
            attention_key(spec),
            {
                "knob": best,
                "ms": {str(b): v for b, v in ms.items()},
                "rows": list(rows),
                "measured_by": measurer.name if measurer else "local",
            },
        )
        done += 1
        worst = max(ms, key=lambda b: sum(ms[b].values()))
        knob = KINDS[spec.kind][0]
        progress(
            f"tuned attention {i}/{len(todo)} {spec.name}: {knob} {best} "
            f"({', '.join(f'{c} {v:.4f} ms' for c, v in ms[best].items())}; worst {knob} {worst}: "
            f"{', '.join(f'{v:.4f}' for v in ms[worst].values())}) in {took:.1f} s"
        )
    return {"done": done, "left": len(todo) - done, "seconds": time.perf_counter() - t0}


def time_local(spec: AttentionKernel, knobs, cases, target=None, rounds: int = 30) -> dict:
    """``{knob: {"M,N": ms}}`` on this machine: interleaved medians over ``rounds`` rounds."""
    target = resolve_target(target or "cpu")
    rng = np.random.default_rng(0)
    data = {c: [tvm.runtime.tensor(a) for a in arrays(spec, *c, rng)] for c in cases}
    fns = {}
    for k in knobs:
        fn = tvm.compile(tvm.IRModule({"main": kernel(spec, k)}), target)["main"]
        for c in cases:
            fns[f"{k} {c[0]},{c[1]}"] = [lambda fn=fn, a=data[c]: fn(*a)]
    t = {key: median_ms(v) for key, v in interleaved(fns, rounds=rounds).items()}
    return {k: {f"{m},{n}": t[f"{k} {m},{n}"] for m, n in cases} for k in knobs}


def measure(
    spec: AttentionKernel, rows=(1,), target=None, rounds: int = 30, knobs=None, lengths=LENGTHS, timer=None
) -> tuple[int, dict]:
    """Time ``spec``'s kernel for every knob (default :func:`candidates`) at every (query rows
    ``rows`` x cache ``lengths``) (batch 1; rows PROMPT: a prompt over itself, M = N for the
    lengths up to PROMPT_MAX); returns (best knob, {knob: {"M,N": ms}}). ``timer(spec, knobs,
    cases)`` measures (default :func:`time_local`; tuning/rpc.py measures on RPC servers). The
    best minimises the mean over (M, N) of its time relative to the fastest knob there, so short
    and long caches count alike."""
    knobs = tuple(knobs or A.candidates(spec))
    cases = timing_cases(rows, lengths)
    ms = timer(spec, knobs, cases) if timer else time_local(spec, knobs, cases, target, rounds)
    score = {k: np.mean([ms[k][c] / min(ms[x][c] for x in knobs) for c in ms[k]]) for k in knobs}
    return min(score, key=score.get), ms
