"""The compile pipeline after the rewrite: lowering (our decode-time passes, then TVM's legalize,
fold and fuse), scheduling (tuned records, then our default rules) and the build into one VM
executable; used by compile, calibration, the tuner and the benchmarks alike."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


# -- rewrite: weight matmuls -> LUT kernel calls, then sibling calls stacked ---------------------
def rewrite_weights(mod, params, options, plan, kernel: str, knobs, also=(), keep_dequantized: bool = False):
    """Every constant-weight matmul of ``main`` (and of the ``also`` functions, sharing the packed
    weights) as a LUT kernel call with ``plan``'s fits (calibration.plan.FitPlan), then, on the AVX2
    kernel with ``options.optimization.stack_siblings``, calls reading one activation stacked into
    one. Returns (module, params, RewriteReport)."""
    from .fuse_sibling_luts import fuse_sibling_luts
    from .rewrite_lut_matmul import rewrite_lut_matmul

    mod, params, report = rewrite_lut_matmul(
        mod,
        params,
        options.bcq(),
        skip=tuple(options.quant.skip),
        keep_dequantized=keep_dequantized,
        fitted=plan.fitted,
        layer_bits=plan.layer_bits,
        kernel=kernel,
        knobs=knobs,
        also=also,
    )
    report.allocation = plan.allocation
    if kernel == "avx2" and options.optimization.stack_siblings:
        mod, params, fewer = fuse_sibling_luts(mod, params, ("main", *also), knobs)
        if fewer:
            logger.info(f"stacked sibling LUT calls (Q/K/V, gate/up): {fewer} kernel calls fewer over all functions")
    return mod, params, report


# -- decode-time: one sequence, one token --------------------------------------------------------
def with_decode_one(mod, extra: dict):
    """``mod`` with ``decode_one`` (static shapes for everything but the attention over the cache)
    when it has a ``decode`` function, and the manifest's description of every function."""
    from .specialize_decode import NAME, add_decode_one

    imports = dict(extra)
    if extra:
        mod = add_decode_one(mod)
        imports[NAME] = extra["decode"]
    return mod, imports


# -- lowering: our passes over the cache, then TVM's legalize, fold and fuse ---------------------


def _attention(mod, knob_of=None):
    """(module, {AttentionKernel: static query rows}) after the three attention-over-the-cache passes."""
    from .scores_from_cache import scores_from_cache
    from .softmax_with_mask import softmax_with_mask
    from .values_from_cache import values_from_cache

    specs = {}
    for rewrite in (scores_from_cache, values_from_cache, softmax_with_mask):
        mod, _, found = rewrite(mod, knob_of)
        specs.update(found)
    return mod, specs


def lower(mod, target, share_kv: bool = True, attention: bool = True, attention_knob=None):
    """The Relax module as :func:`build` schedules it: same-dtype casts dropped
    (relax_passes/drop_identity_casts.py), grouped-query attention without per-head
    copies of the cache (``share_kv``, relax_passes/share_kv_heads.py), attention over the cache on
    our kernels (``attention``: scores_from_cache, values_from_cache, softmax_with_mask; knobs
    from ``attention_knob(spec)``, e.g. TuningDB.attention_knob), legalized, folded and fused."""
    from tvm import relax

    from .drop_identity_casts import drop_identity_casts

    mod, _ = drop_identity_casts(mod)
    if share_kv:
        from .share_kv_heads import share_kv_heads

        mod, _ = share_kv_heads(mod)
    if attention:
        mod, _ = _attention(mod, attention_knob)
    with target:
        return relax.get_default_pipeline(target)(mod)


def attention_kernels(mod) -> dict:
    """The attention kernels ``lower`` gives ``mod`` (after the same casts and head sharing):
    ``{AttentionKernel: static query rows of their calls}``, what ``shiftadd tune`` times."""
    from .drop_identity_casts import drop_identity_casts
    from .share_kv_heads import share_kv_heads

    return _attention(share_kv_heads(drop_identity_casts(mod)[0])[0])[1]


def build(mod, target, db=None, share_kv: bool = True, attention: bool = True):
    """Relax module -> VM executable, with the CPU pipeline (legalize, fold, fuse); operators the
    MetaSchedule database beside the tuning database ``db`` holds get its schedules, the rest ours.
    ``share_kv``: grouped-query attention reads each key/value head once (relax_passes/share_kv_heads);
    ``attention``: attention over the KV cache runs our kernels (scores and values read the cache in
    place, softmax with the mask fused in; :func:`lower`), with the knob the tuning database
    ``db`` holds for each (``shiftadd tune``), else the default."""
    import tvm

    from ..schedules.default_cpu import schedule_unscheduled
    from ..tuning.database import TuningDB
    from ..tuning.metaschedule import apply_float

    if uses_avx2_kernel(mod):  # in-memory runs resolve the micro-kernel from this process
        from ..schedules import lut_avx2

        lut_avx2.load_in_process()
    knobs = TuningDB.open(db, target=target).attention_knob if attention else None
    mod = apply_float(lower(mod, target, share_kv, attention, knobs), target, db)
    with target:
        mod = schedule_unscheduled(mod, target)
    return tvm.compile(mod, target, relax_pipeline=None)


def uses_avx2_kernel(mod) -> bool:
    return any(gv.name_hint.startswith("shiftadd_lut8") for gv, _ in mod.functions_items())


def export(ex, path: str, mod) -> None:
    """Write the executable as one .so, with the AVX2 micro-kernel linked in when ``mod`` calls it."""
    if uses_avx2_kernel(mod):
        from ..schedules import lut_avx2

        lut_avx2.export(ex, path)
    else:
        ex.export_library(path)
