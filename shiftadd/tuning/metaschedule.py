"""MetaSchedule for the float operators the rewrite leaves: the part of ``shiftadd tune`` that tunes
the rest of the model (norms, RoPE, activations, a float ``lm_head``), beside our kernels' knob grid.

Which operators: MetaSchedule keys workloads by the exact PrimFunc (static shapes), so only static
ones can be tuned: those of ``decode_one`` (one sequence, one token) and of static ONNX models.
Attention over the KV cache (``past`` is symbolic) runs our kernels (schedules/attention_cpu.py),
whose knobs ``shiftadd tune`` searches itself; other symbolic operators keep the default schedules
(default_cpu.py), as do static ones under SERIAL_WORK iterations, which SmallStatic runs serially:
a parallel schedule only adds a thread-pool launch to them.

Baseline: the default schedule of every task is measured by the same runner and stored as a record
of its own, so applying the database picks MetaSchedule's result only where it measured faster.

Where: ``<database folder>/<database stem>-metaschedule/<context>/`` holds MetaSchedule's JSON
database (workloads and records, appended as they are measured: an interrupted job keeps them).
``<context>`` hashes the TVM version, the target (CPU model and features), the thread count and
VERSION; a database of another context is in another folder and never read, so a stale entry is
never applied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)


VERSION = 1
TRIALS = 32  # per task: what a short budget affords on a small machine for a few tasks (docs/ENGINEERING.md)
SECONDS_PER_TRIAL = 4.0  # first estimate, until a task has been timed (docs/ENGINEERING.md)


def context(target) -> dict:
    import tvm
    from tvm.target import codegen

    feats = []
    for f in ("avx2", "fma", "f16c", "avx512f", "neon"):
        try:
            if codegen.target_has_features([f], target):
                feats.append(f)
        except Exception:  # noqa: BLE001 - a feature this target kind does not know
            pass
    return {
        "version": VERSION,
        "tvm": tvm.__version__,
        "target": str(target.attrs.get("mcpu", "generic")),
        "features": feats,
        "threads": int(os.environ.get("TVM_NUM_THREADS", "0") or 0),
    }


def work_dir(db, target) -> Path:
    """MetaSchedule's folder for ``target`` beside the knob database ``db`` (a file or folder):
    ``<folder>/<db stem>-metaschedule/<context>/``, one per knob database file."""
    from .database import TuningDB

    path = TuningDB.open(db, target=target).path
    root = path.parent / f"{path.stem}-metaschedule"
    ctx = context(target)
    digest = hashlib.sha256(json.dumps(ctx, sort_keys=True).encode()).hexdigest()[:12]
    return root / digest


def _default_schedule(func, target):
    """Our default schedule of ``func`` (the first rule of schedule_unscheduled that takes it)."""
    from ..schedules.default_cpu import rules

    for rule in rules():
        sch = rule.apply(func, target, False)
        if isinstance(sch, list):
            sch = sch[0] if sch else None
        if sch is not None:
            return sch
    return None


def _call_counts(mod) -> dict[str, int]:
    """How often each global is referenced from the Relax functions of ``mod`` (calls per run)."""
    from tvm import relax

    counts: dict[str, int] = {}

    @relax.expr_functor.visitor
    class Count(relax.PyExprVisitor):
        def visit_global_var_(self, gv):
            counts[gv.name_hint] = counts.get(gv.name_hint, 0) + 1

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            Count().visit_expr(f)
    return counts


def tunable_tasks(lowered, target, min_work: int | None = None) -> list:
    """MetaSchedule tasks of ``lowered``'s float operators worth tuning: unscheduled (not our kernels),
    static, with more than ``min_work`` loop iterations (default SERIAL_WORK), heaviest first (work
    times calls). Built from the PrimFuncs themselves: after the pipeline no ``call_tir`` is left for
    MetaSchedule's own extraction to find."""
    from tvm import tirx
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from ..schedules.default_cpu import SERIAL_WORK, static_work

    min_work = SERIAL_WORK if min_work is None else min_work
    calls = _call_counts(lowered)
    picked = []
    for gv, func in lowered.functions_items():
        if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
            continue
        work = static_work(func)
        if work is None or work <= min_work or not calls.get(gv.name_hint):
            continue
        m = _normalize_mod(_anonymous(func))
        task = ms.ExtractedTask(gv.name_hint, m, target, [m], calls[gv.name_hint])
        picked.append((work * calls[gv.name_hint], task))
    return [t for _, t in sorted(picked, key=lambda wt: -wt[0])]


def _import_tensor_intrin() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule's TuneContext does) without reading source.

    Its ~500 TVMScript intrinsics each call ``inspect.stack()``, which looks up every frame's source
    file through ``inspect.getmodule`` over all loaded modules: slow with torch loaded, even without
    source context (docs/ENGINEERING.md). The parser needs the frames only, so the import runs with
    frame records built straight from the frames; restored after."""
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return

    def frames(frame, context=1):
        out = []
        while frame is not None:
            out.append(
                inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, None, None)
            )
            frame = frame.f_back
        return out

    original = inspect.getouterframes
    inspect.getouterframes = frames
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.getouterframes = original


def _build(mod, target, _params):
    """MetaSchedule's default_build without its ``import tvm.s_tir.tensor_intrin``: that import parses
    ~500 TVMScript intrinsics (CUDA, ARM, ...) in every builder process, which took longer than the
    builds themselves (docs/ENGINEERING.md); nothing of it is used on CPU."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _runner(rpc: str | None = None, key: str | None = None):
    """This machine's runner, or the servers of the TVM RPC tracker ``rpc`` ('HOST:PORT') under ``key``."""
    from tvm.s_tir import meta_schedule as ms

    cfg = ms.runner.EvaluatorConfig(number=5, repeat=3, min_repeat_ms=50, enable_cpu_cache_flush=True)
    if rpc is None:
        return ms.runner.LocalRunner(evaluator_config=cfg, timeout_sec=60)
    host, port = rpc.rsplit(":", 1)
    return ms.runner.RPCRunner(
        ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key, session_timeout_sec=120),
        evaluator_config=cfg,
    )


def _measure(mod, target, builder, runner) -> float | None:
    """Seconds per run of a scheduled one-function module (MetaSchedule's builder and runner)."""
    from tvm.s_tir import meta_schedule as ms

    built = builder.build([ms.builder.BuilderInput(mod, target)])[0]
    if built.error_msg:
        return None
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    res = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args)])[0].result()
    return None if res.error_msg else float(sum(float(s) for s in res.run_secs) / len(res.run_secs))


def _records(database, workload) -> list:
    return list(database.get_top_k(workload, 10_000))


def tune_float(
    lowered,
    target,
    db=None,
    budget_s: float | None = None,
    trials: int = TRIALS,
    min_work: int | None = None,
    rpc: str | None = None,
    key: str | None = None,
    progress=logger.info,
) -> dict:
    """Tune the static float operators of ``lowered`` (relax_passes.pipeline.lower of the rewritten module) with
    MetaSchedule into the folder of ``db``, heaviest first, each with as many of its ``trials`` as the
    time left of ``budget_s`` affords at the seconds per trial measured so far; stops when fewer than
    one trial fits. Tasks with ``trials`` records already are skipped (resume). Returns a summary
    (tasks, done, complete before, left, seconds, best ms per task)."""
    from tvm.s_tir import meta_schedule as ms

    t0 = time.perf_counter()
    deadline = None if budget_s is None else t0 + budget_s
    wd = work_dir(db, target)
    wd.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(wd))
    tasks = tunable_tasks(lowered, target, min_work)
    builder, runner = ms.builder.LocalBuilder(max_workers=2, timeout_sec=120, f_build=_build), _runner(rpc, key)
    summary = {"folder": str(wd), "tasks": len(tasks), "done": 0, "complete_before": 0, "left": 0, "best": {}}
    per_trial = []
    try:
        for i, task in enumerate(tasks, 1):
            func = task.dispatched[0]
            workload = database.commit_workload(func)
            have = _records(database, workload)
            if len(have) >= trials:
                summary["complete_before"] += 1
                continue
            # trials that fit in what is left of the budget (a partly tuned task gets the rest of its own)
            n = trials - len(have) + (0 if have else 1)  # + the baseline record
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None:
                per = sum(per_trial) / len(per_trial) if per_trial else SECONDS_PER_TRIAL
                n = min(n, int(left / per))
                if n < (1 if have else 2):  # not even one MetaSchedule trial fits
                    summary["left"] = len(tasks) - i + 1
                    break
            ts = time.perf_counter()
            _import_tensor_intrin()  # once, before MetaSchedule's TuneContext does it the slow way
            if not have:  # the default schedule first: the baseline every tuned record must beat
                sch = _default_schedule(func["main"], target)
                sec = None if sch is None else _measure(sch.mod, target, builder, runner)
                if sec is not None:
                    database.commit_tuning_record(
                        ms.database.TuningRecord(
                            sch.trace, workload, [sec], target, ms.arg_info.ArgInfo.from_prim_func(func["main"])
                        )
                    )
            ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts([task], str(wd), num_threads=2)
            ms.tune_tasks(
                tasks=ctxs,
                task_weights=weights,
                work_dir=str(wd),
                max_trials_global=n - (0 if have else 1),
                num_trials_per_iter=min(n, 16),
                builder=builder,
                runner=runner,
                database=database,
                cost_model="xgb",
            )
            per_trial.append((time.perf_counter() - ts) / n)
            best = _records(database, workload)
            summary["done"] += 1
            name = task.task_name
            secs = [float(sum(float(s) for s in r.run_secs) / len(r.run_secs)) for r in best if r.run_secs]
            summary["best"][name] = min(secs) * 1e3 if secs else None
            rest = "" if deadline is None else f", {max(0.0, deadline - time.perf_counter()):.0f} s left"
            progress(
                f"metaschedule {i}/{len(tasks)} {name}: best {summary['best'][name]:.3f} ms "
                f"of {len(best)} records ({time.perf_counter() - ts:.0f} s){rest}"
            )
    finally:
        pool = getattr(runner, "pool", None)
        if pool is not None:  # its worker processes would otherwise outlive the job
            pool.shutdown()
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _anonymous(func):
    """``func`` as MetaSchedule keys it here: without its name. The pipeline numbers operators
    (``matmul5``, ``matmul6``, ...) in an order that can differ between two lowerings of one graph,
    and the database's workload key includes the function's attributes, so a named key could make a
    tuned operator look new (tuned again, or not applied)."""
    return func.with_attr("global_symbol", "main")


def apply_float(lowered, target, db=None):
    """``lowered`` with every PrimFunc the MetaSchedule database of ``db`` holds replaced by its
    best record (faster than our default schedule, which is a record too); unchanged without one.
    Looked up by content (:func:`_anonymous`), as :func:`tunable_tasks` committed it."""
    from tvm import tirx
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    wd = work_dir(db, target)
    if not (wd / "database_tuning_record.json").exists():
        return lowered
    database = ms.database.JSONDatabase(work_dir=str(wd))
    out = lowered
    with target:
        for gv, func in lowered.functions_items():
            if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
                continue
            m = _normalize_mod(_anonymous(func))
            if not database.has_workload(m):
                continue
            sch = database.query_schedule(m, target, workload_name="main")
            if sch is None:
                continue
            new = sch.mod["main"].with_attr("global_symbol", gv.name_hint).with_attr("tirx.is_scheduled", True)
            out = _with_func(out, gv, new)
    return out


def _with_func(mod, gv, func):
    import tvm

    funcs = dict(mod.functions_items())
    funcs[gv] = func
    return tvm.IRModule(funcs, attrs=mod.attrs)
