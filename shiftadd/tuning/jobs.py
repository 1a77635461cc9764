"""``shiftadd tune``: find the distinct LUT kernels a model compiles to and tune them into the database,
within a time budget, locally or on remote machines over TVM RPC. Resumable: every finished phase
(decode knobs at M = 1, batch knobs at M = 32) of every kernel is saved at once, and a rerun skips
what the database already holds."""

from __future__ import annotations

import logging
import re
import time

from ..config import DEFAULT_OPT, DEFAULT_PRESET, resolve
from ..quant import BCQConfig
from ..quant.allocate import CHOICES

logger = logging.getLogger(__name__)


def parse_budget(spec) -> float | None:
    """'20m', '90s', '1h', '1h30m', '300' (seconds) -> seconds; None/'none' -> no budget."""
    if spec is None or str(spec).lower() in ("", "none"):
        return None
    text = str(spec).strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
    if not parts or not any(parts.groups()):
        raise ValueError(f"--budget: expected a duration like 20m, 90s, 1h30m or seconds, got {spec!r}")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    seconds = 3600 * h + 60 * m + s
    if seconds <= 0:
        raise ValueError(f"--budget must be positive, got {spec!r}")
    return seconds


def model_matmuls(model: str) -> tuple[list[tuple[str, int, int]], list[list[str]]]:
    """((weight name, K, N) of the weight matmuls of ``model`` (HF id/folder, GGUF, 'smollm2', .onnx),
    the groups of them that read one activation: compile stacks those into one kernel call)."""
    from ..frontend import import_model
    from ..relax_passes.rewrite_lut_matmul import sibling_groups, weight_matmul_shapes

    imported = import_model(model, kv_cache=False).imported
    main = imported.mod["main"]
    return weight_matmul_shapes(main, imported.params, ()), sibling_groups(main, imported.params, ())


def model_module(model: str, cfg: BCQConfig, skip, target):
    """(weight matmul shapes, sibling groups, the Relax module ``compile`` builds for ``model``): exported with the KV
    cache, rewritten and specialised (``decode_one``) as compile does, but with one-round fits and no
    calibration: the float operators left to tune depend on shapes, not on the fitted values."""
    from dataclasses import replace

    from ..frontend import import_model, merge_functions
    from ..relax_passes.pipeline import Pipeline, Rewrite, Weights
    from ..relax_passes.rewrite_lut_matmul import sibling_groups, weight_matmul_shapes
    from ..schedules.backends import pick_kernel

    loaded = import_model(model)
    imported, extra = loaded.imported, loaded.extra
    shapes = weight_matmul_shapes(imported.mod["main"], imported.params, ())
    siblings = sibling_groups(imported.mod["main"], imported.params, ())
    mod = merge_functions(imported, extra) if extra else imported.mod
    rewrite = Rewrite(replace(cfg, rounds=1), skip=tuple(skip), kernel=pick_kernel("auto", target), also=tuple(extra))
    pipeline = Pipeline(target, rewrite=rewrite, weights=Weights(imported.params), decode_one=bool(extra))
    return shapes, siblings, pipeline.run(mod, "rewrite", "decode")


def kernel_keys(matmuls, cfg: BCQConfig, skip=("lm_head",), bits_set=None, siblings=()) -> list[tuple]:
    """Tuning keys (K, N, bits, group, offset, rows per scale, e5m2 scales, tied scales) of the AVX2 kernels these
    matmuls compile to under ``cfg`` (``bits_set``: every bit width a per-layer allocation may pick), and of the
    stacked calls of ``siblings`` (groups of names reading one activation; stacked when every member's N is a
    multiple of 32 and they share bits). Layouts the AVX2 kernel does not read (odd groups, the column layout) have
    nothing to tune."""
    from ..schedules import lut_avx2 as L

    if cfg.layout == "column":
        raise ValueError(
            "tune: the column layout runs a one-bit kernel over pre-scaled inputs; tune the row-group or block layout"
        )
    pats = [re.compile(p) for p in skip]
    fmt = (cfg.scale_format == "e5m2", bool(cfg.tied))
    keys = []
    for name, k, n in matmuls:
        if any(p.search(name) for p in pats):
            continue
        group, rows = (cfg.group_for(k), 1) if cfg.layout == "row-group" else (8, cfg.block_rows)
        if not L.supports(group, rows):
            continue
        for b in bits_set or (cfg.bits,):
            keys.append((k, n, b, group, cfg.offset, rows, *fmt))
    shape = {name: (k, n) for name, k, n in matmuls}
    for names in siblings:
        names = [x for x in names if x in shape and not any(p.search(x) for p in pats)]
        if len(names) < 2 or cfg.layout != "row-group" or any(shape[x][1] % L.ROWS for x in names):
            continue
        k = shape[names[0]][0]
        group = cfg.group_for(k)
        if L.supports(group, 1):
            for b in bits_set or (cfg.bits,):
                keys.append((k, sum(shape[x][1] for x in names), b, group, cfg.offset, 1, *fmt))
    return list(dict.fromkeys(keys))


def tune(
    model: str,
    quant: str = DEFAULT_PRESET,
    opt: str = DEFAULT_OPT,
    *,
    db=None,
    target: str = "cpu",
    budget=None,
    rpc: str | None = None,
    key: str | None = None,
    rounds: int = 5,
    repeat: int = 20,
    parallel: int | None = None,
    float_ops: bool = True,
    float_trials: int | None = None,
    float_min_work: int | None = None,
    **overrides,
) -> dict:
    """Tune the kernels ``model`` needs into ``db`` (a file or folder; default the user database) and return a summary;
    ``quant``, ``opt`` and ``overrides`` as the compile will use them (config.resolve: each scale storage runs its
    own loop and has its own entries). ``budget`` (seconds or '20m') bounds the search; ``rpc`` ('HOST:PORT' of a TVM
    tracker) with ``key`` measures on the servers registered there, for ``target`` (their CPU). Our LUT kernels'
    knobs are tuned first; then, with ``float_ops``, the knobs of our attention kernels over the cache (scores,
    softmax, values) and MetaSchedule for the static float operators left (``float_trials`` per operator, those over
    ``float_min_work`` loop iterations; tuning/metaschedule.py) in the time left."""
    from ..schedules import lut_avx2 as L
    from ..schedules.targets import resolve_target
    from .database import TuningDB
    from .search import tune_phases

    budget_s = parse_budget(budget)
    tgt = resolve_target(target)
    if not L.target_supported(tgt):
        raise ValueError(
            f"tune: target {tgt.attrs.get('mcpu', '?')!r} lacks AVX2/FMA/F16C: the tunable LUT "
            "kernel does not run there"
        )
    if (key is not None) and rpc is None:
        raise ValueError("--key needs --rpc HOST:PORT (the tracker the servers registered with)")
    options = resolve(quant, opt, overrides)
    cfg, skip, avg_bits = options.bcq(), options.quant.skip, options.quant.avg_bits
    if rpc is not None:
        from .rpc import RPCMeasurer

        measurer = RPCMeasurer(rpc, key, tgt, repeat=repeat, parallel=parallel)
    else:
        if str(target) not in ("cpu", "llvm", "host") and not L.target_supported(resolve_target("cpu")):
            raise ValueError("tune: measuring locally needs this machine to be the target; use --rpc")
        from .search import LocalMeasurer

        measurer = LocalMeasurer(rounds=rounds)
    try:
        tdb = TuningDB.open(db, target=tgt)
        t0 = time.time()
        if float_ops:
            shapes, siblings, module = model_module(model, cfg, skip, tgt)
        else:
            (shapes, siblings), module = model_matmuls(model), None
        keys = kernel_keys(shapes, cfg, skip, CHOICES if avg_bits is not None else None, siblings)
        have = sum(tdb.get(*kk) is not None for kk in keys)
        logger.info(
            f"tune: {len(keys)} distinct kernels ({have} already in {tdb.path}), measured {measurer.name}, "
            f"budget {'none' if budget_s is None else f'{budget_s:.0f} s'}"
        )
        left = None if budget_s is None else budget_s - (time.time() - t0)
        if left is not None and left <= 0:
            raise TimeoutError(f"--budget {budget}: spent reading the model ({time.time() - t0:.0f} s) before tuning")
        summary = tune_phases(tdb, keys, measurer, left)
        if module is not None:  # our attention kernels' knobs, measured where the LUT kernels were
            from ..relax_passes.pipeline import attention_kernels
            from .search import tune_attention

            left = None if budget_s is None else budget_s - (time.time() - t0)
            summary["attention"] = tune_attention(
                tdb, attention_kernels(module), left, rounds=6 * rounds, measurer=measurer if rpc is not None else None
            )
    finally:
        if hasattr(measurer, "close"):  # hands the RPC servers back before MetaSchedule asks for them
            measurer.close()
    if module is not None:
        from ..relax_passes.pipeline import lower
        from .metaschedule import TRIALS, tune_float

        left = None if budget_s is None else budget_s - (time.time() - t0)
        summary["float"] = tune_float(
            lower(module, tgt), tgt, tdb.path, left, float_trials or TRIALS, float_min_work, rpc=rpc, key=key
        )
    summary.update(
        db=str(tdb.path),
        measured_by=measurer.name,
        complete=sum(tdb.get(*kk) is not None for kk in keys),
        seconds_total=time.time() - t0,
    )
    logger.info(
        f"tune: {summary['complete']}/{len(keys)} kernels complete in {tdb.path} "
        f"({summary['phases_done']} phases measured now, {summary['phases_left']} left) "
        f"in {summary['seconds_total']:.0f} s"
    )
    return summary
