"""Every pass of a compile, in one ordered list: compile, calibration, the tuner and the benchmarks
all run slices of :meth:`Pipeline.passes`, and nothing else lists passes.

Phases, in order:
  rewrite   ``prefill_last`` (``main`` with the last position's logits only, for generation), then
            constant-weight matmuls -> LUT kernel calls in every function (the packed weights
            travel beside the module in :class:`Weights`), then sibling calls on one activation
            stacked into one
  decode    ``decode_one``: the cached decode step with static shapes but for the cache length;
            ``decode_step``: the same over a preallocated cache written in place, and ``kv_resize``
  lower     our passes over the cache (same-dtype casts dropped, RMSNorms as one op, KV heads shared,
            attention on our kernels reading the in-place cache), then TVM's legalize, fold and fuse
  schedule  tuned MetaSchedule records, then our default rules for every unscheduled PrimFunc,
            then float32 exp / sigmoid as inline polynomials the vectoriser can take
After them ``tvm.compile`` builds the VM executable and :func:`export` writes the one .so.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import tvm

logger = logging.getLogger(__name__)

PHASES = ("rewrite", "decode", "lower", "schedule")


@dataclass
class Weights:
    """The module's weight arrays beside it: the rewrite replaces float weights by packed ones."""

    params: dict
    report: object | None = None  # the rewrite's RewriteReport
    attention: dict = field(default_factory=dict)  # AttentionKernel -> static query rows (lowering finds them)


@dataclass
class Rewrite:
    """What the rewrite phase needs: the quantization config, finished fits (weight-only fits are
    made for the rest), per-layer bits, the kernel back-end and its knobs, the functions sharing
    the weights."""

    cfg: object  # BCQConfig
    fitted: dict = field(default_factory=dict)  # weight name -> BCQWeight
    layer_bits: dict | None = None
    allocation: object = None  # calibration.plan.Allocation, kept on the report
    skip: tuple = ("lm_head",)
    kernel: str = "f32"
    knobs: object = None  # (*LUTSpec) -> (decode, batch) knobs, e.g. from the tuning database
    also: tuple = ()
    stack_siblings: bool = True
    keep_dequantized: bool = False


def _pass(name: str, fn):
    """One of our rewrites ``fn(mod) -> (mod, count, ...)`` as a module pass; its count is logged."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def run(mod, _ctx):
        out = fn(mod)
        if isinstance(out, tuple):
            mod, count = out[0], out[1]
            logger.debug(f"{name}: {count}")
            return mod
        return out

    return run


@dataclass
class Pipeline:
    """The passes for one target and set of switches (config.OptimizationConfig's)."""

    target: object
    rewrite: Rewrite | None = None
    weights: Weights | None = None
    decode_one: bool = False
    decode_step: bool = True  # with decode_one: its in-place twin, where the graph allows it
    max_context: int | None = None  # the model's context: decode_step's length bound for memory planning
    prefill_last: bool = False
    share_kv: bool = True
    fuse_norms: bool = True  # spelled-out RMSNorms -> one kernel each
    attention: bool = True
    attention_knob: object = None  # AttentionKernel -> knob (tuning.records.Records.attention_knob)
    records: object = None  # lowered module -> with tuned schedules (tuning.records.Records.apply)
    legalize: bool = True  # False stops the lower phase before TVM's legalize/fold/fuse

    def passes(self, *phases: str) -> list:
        """The ordered passes of ``phases`` (default: all)."""
        want = set(phases or PHASES)
        unknown = want - set(PHASES)
        if unknown:
            raise ValueError(f"unknown pipeline phases {sorted(unknown)}: expected some of {PHASES}")
        seq = []
        # -- rewrite ------------------------------------------------------------------------------
        if "rewrite" in want and self.prefill_last:
            from .last_position_logits import add_last_position_logits, has_logits_matmul

            seq.append(  # a model whose first output is no logits matmul just has no prefill_last
                _pass(
                    "shiftadd.AddLastPositionLogits",
                    lambda m: add_last_position_logits(m) if has_logits_matmul(m) else m,
                )
            )
        if "rewrite" in want and self.rewrite is not None:
            seq.append(_pass("shiftadd.RewriteLUTMatmul", self._rewrite))
            from ..schedules.backends import BACKENDS

            if BACKENDS[self.rewrite.kernel].stackable and self.rewrite.stack_siblings:
                seq.append(_pass("shiftadd.FuseSiblingLUTs", self._stack))
        # -- decode-time --------------------------------------------------------------------------
        if "decode" in want and self.decode_one:
            from .specialize_decode import add_decode_one

            seq.append(_pass("shiftadd.AddDecodeOne", add_decode_one))
            if self.decode_step:
                seq.append(_pass("shiftadd.AddDecodeStep", lambda m: _decode_step(m, self.max_context)))
        # -- lowering -----------------------------------------------------------------------------
        if "lower" in want:
            from .convolutions_as_matmuls import convolutions_as_matmuls
            from .drop_identity_casts import drop_identity_casts
            from .fuse_rms_norm import fuse_rms_norm
            from .kv_cache_in_place import attention_reads_cache
            from .scores_from_cache import scores_from_cache
            from .share_kv_heads import share_kv_heads
            from .softmax_with_mask import softmax_with_mask
            from .values_from_cache import values_from_cache

            seq.append(_pass("shiftadd.DropIdentityCasts", drop_identity_casts))
            if self.fuse_norms:
                seq.append(_pass("shiftadd.FuseRMSNorm", fuse_rms_norm))
            seq.append(_pass("shiftadd.ConvolutionsAsMatmuls", convolutions_as_matmuls))
            if self.share_kv:
                seq.append(_pass("shiftadd.ShareKVHeads", share_kv_heads))
            if self.attention:
                for name, rewrite in (
                    ("ScoresFromCache", scores_from_cache),
                    ("ValuesFromCache", values_from_cache),
                    ("SoftmaxWithMask", softmax_with_mask),
                ):
                    seq.append(_pass(f"shiftadd.{name}", lambda m, r=rewrite: self._attention(r, m)))
                seq.append(_pass("shiftadd.AttentionReadsCache", attention_reads_cache))
            if self.legalize:
                seq.append(_pass("relax.DefaultPipeline", self._default_pipeline))
        # -- scheduling ---------------------------------------------------------------------------
        if "schedule" in want:
            seq.append(_pass("shiftadd.ApplyTunedRecords", self._tuned))
            seq.append(_pass("shiftadd.DefaultSchedules", self._default_schedules))
            seq.append(_pass("shiftadd.VectorisableMath", _vectorisable_math))
        return seq

    def run(self, mod, *phases: str):
        return tvm.transform.Sequential(self.passes(*phases))(mod)

    # -- the passes that need more than the module ---------------------------------------------
    def _rewrite(self, mod):
        from .rewrite_lut_matmul import rewrite_lut_matmul

        r, w = self.rewrite, self.weights
        mod, w.params, w.report = rewrite_lut_matmul(
            mod,
            w.params,
            r.cfg,
            skip=tuple(r.skip),
            keep_dequantized=r.keep_dequantized,
            fitted=r.fitted,
            layer_bits=r.layer_bits,
            kernel=r.kernel,
            knobs=r.knobs,
            also=self._also(mod),
        )
        w.report.allocation = r.allocation
        return mod, len(w.report.rewritten)

    def _also(self, mod) -> tuple:
        """The functions beside ``main`` that share its weights: the imported ones and ``prefill_last``."""
        from .last_position_logits import NAME

        have = {gv.name_hint for gv, _ in mod.functions_items()}
        return (*self.rewrite.also, *((NAME,) if NAME in have and NAME not in self.rewrite.also else ()))

    def _stack(self, mod):
        from .fuse_sibling_luts import fuse_sibling_luts

        mod, self.weights.params, fewer = fuse_sibling_luts(
            mod, self.weights.params, ("main", *self._also(mod)), self.rewrite.knobs
        )
        if fewer:
            logger.info(f"stacked sibling LUT calls (Q/K/V, gate/up): {fewer} kernel calls fewer over all functions")
        return mod, fewer

    def _attention(self, rewrite, mod):
        mod, count, found = rewrite(mod, self.attention_knob)
        if self.weights is not None:
            self.weights.attention.update(found)
        return mod, count

    def _default_pipeline(self, mod):
        from tvm import relax

        with self.target:
            return relax.get_default_pipeline(self.target)(mod)

    def _tuned(self, mod):
        return self.records(mod) if self.records is not None else mod

    def _default_schedules(self, mod):
        from ..schedules.default_cpu import schedule_unscheduled

        with self.target:
            return schedule_unscheduled(mod, self.target)


def _vectorisable_math(mod):
    from ..schedules.vector_math import vectorisable_math_module

    return vectorisable_math_module(mod)


def _decode_step(mod, max_context=None):
    """``decode_step`` and ``kv_resize`` beside ``decode_one``; a decode graph whose past is read
    otherwise than appended to keeps ``decode_one`` alone (logged)."""
    from .kv_cache_in_place import add_decode_step

    try:
        return add_decode_step(mod, max_context=max_context)
    except ValueError as e:
        logger.info(f"no in-place KV cache for this graph: {e}")
        return mod


def uses_avx2_kernel(mod) -> bool:
    return any(gv.name_hint.startswith("shiftadd_lut8") for gv, _ in mod.functions_items())


def build(mod, target, tuned=None, share_kv: bool = True, attention: bool = True):
    """The lower and schedule phases, then ``tvm.compile``: Relax module -> VM executable. ``tuned``
    (tuning.records.Records: what ``shiftadd tune`` stored for this target) gives the attention
    kernels' knobs and the float operators' schedules; without it the defaults serve."""
    if uses_avx2_kernel(mod):  # in-memory runs resolve the micro-kernel from this process
        from ..schedules import native as N

        N.load_in_process()
    knob = tuned.attention_knob if tuned is not None and attention else None
    records = tuned.apply if tuned is not None else None
    pl = Pipeline(target, share_kv=share_kv, attention=attention, attention_knob=knob, records=records)
    with _naming_failures() as last:
        lowered = pl.run(mod, "lower", "schedule")
        last.current = "code generation (tvm.compile)"
        return tvm.compile(lowered, target, relax_pipeline=None)


def preflight(mod, target, share_kv: bool = True, attention: bool = True) -> None:
    """Lower and schedule the float module, so that a graph TVM cannot lower fails in seconds, before
    calibration and fitting; raises :class:`BuildError`."""
    with _naming_failures():
        Pipeline(target, share_kv=share_kv, attention=attention).run(mod, "lower", "schedule")


class BuildError(RuntimeError):
    """TVM could not lower or build the module: names the pass and TVM's own reason."""


@contextlib.contextmanager
def _naming_failures():
    """Run passes with the name of the one running kept; a failure becomes a :class:`BuildError`
    naming it (TVM's own check messages say neither the pass nor that the model is at fault)."""

    @tvm.instrument.pass_instrument
    class LastPass:
        def __init__(self):
            self.current = None

        def run_before_pass(self, _mod, info):
            self.current = info.name

    last, cur = LastPass(), tvm.transform.PassContext.current()
    ctx = tvm.transform.PassContext(
        opt_level=cur.opt_level,
        required_pass=list(cur.required_pass),
        disabled_pass=list(cur.disabled_pass),
        instruments=[*cur.instruments, last],
        config=dict(cur.config),
    )
    try:
        with ctx:
            yield last
    except BuildError:
        raise
    except Exception as e:  # noqa: BLE001 - TVM raises its own error types from C++
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else type(e).__name__
        reason = reason if len(reason) > 20 or len(lines) < 2 else f"{lines[-2]} {reason}"
        raise BuildError(
            f"TVM {tvm.__version__} could not lower the imported graph: pass '{last.current}' failed "
            f"({type(e).__name__}: {reason[:300]}). This is a limit of TVM's compiler on this graph, "
            "not a fault of the file; docs/MODELS.md lists the graphs known to fail and why"
        ) from None


def lower(mod, target, share_kv: bool = True, attention: bool = True, attention_knob=None):
    """The lower phase alone: the module whose float operators MetaSchedule tunes."""
    return Pipeline(target, share_kv=share_kv, attention=attention, attention_knob=attention_knob).run(mod, "lower")


def attention_kernels(mod) -> dict:
    """``{AttentionKernel: static query rows of their calls}`` the lower phase gives ``mod``: what
    ``shiftadd tune`` times."""
    weights = Weights({})
    Pipeline(None, weights=weights, legalize=False).run(mod, "lower")
    return weights.attention


def export(ex, path: str, mod) -> None:
    """Write the executable as one .so, with the AVX2 micro-kernel linked in when ``mod`` calls it."""
    if uses_avx2_kernel(mod):
        from ..schedules import native as N

        N.export(ex, path)
    else:
        ex.export_library(path)
