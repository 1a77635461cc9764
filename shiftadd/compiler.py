"""``shiftadd.compile``: model (HF id/path, GGUF, 'smollm2', or ONNX file) -> artifact (.so + params)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ._version import __version__
from .calibration.arrays import array_batches
from .calibration.plan import fit_weights
from .calibration.text import calibration_batches
from .config import DEFAULT_CALIB_WINDOWS, DEFAULT_OPT, DEFAULT_PRESET, CompileOptions, resolve
from .frontend import import_model, is_onnx, merge_functions
from .phases import Phases, phase
from .quant.executors import executor_for, using
from .relax_passes.ir import embedding_rows
from .relax_passes.pipeline import Pipeline, Rewrite, Weights, build, export, preflight
from .relax_passes.rewrite_lut_matmul import check_group
from .runtime.artifact import ArtifactWriter, paths
from .schedules.backends import BACKENDS, pick_kernel
from .schedules.targets import resolve_target, target_dict
from .tuning.records import records

logger = logging.getLogger(__name__)


@dataclass
class CompileResult:
    so: Path
    manifest: dict
    report: object | None  # RewriteReport, or None when the rewrite is off
    phases: list | None = None  # per phase: seconds and peak RSS (shiftadd/phases.py)


def compile(
    model: str,
    output: str | os.PathLike,
    quant: str = DEFAULT_PRESET,
    opt: str = DEFAULT_OPT,
    *,
    target: str = "cpu",
    tokenizer=None,
    db: str | os.PathLike | None = None,
    keep_dequantized: bool = False,
    calibration_data: str | os.PathLike | None = None,
    cluster: str | None = None,
    **overrides,
) -> CompileResult:
    """Compile ``model`` into ``output`` (a ``.so`` path; params, manifest and tokenizer go beside it).

    ``quant`` names a quantization preset and ``opt`` an optimization level (shiftadd/config.py,
    ``shiftadd presets``); ``overrides`` set single fields of either or of the calibration (e.g.
    ``group=128, windows=0``). ``db``: the tuning database the kernels' knobs come from (default
    ~/.cache/shiftadd/tuning.json or $SHIFTADD_TUNING_DB). ``tokenizer`` (a model id/path, 'smollm2',
    or a loaded tokenizer) is stored with an ONNX input, for text prompts and calibration.
    ``keep_dequantized`` keeps each rewritten weight's dequantized value in the report (tests).
    ``calibration_data``: a ``.npz`` of calibration inputs (one array per model input, samples along
    the first axis: images for a ViT) instead of the wiki text windows. ``cluster``: run the
    error-feedback fit tasks on this Ray cluster (``ray://HOST:PORT``; quant/executors.py): the
    artifact is the one a local compile writes."""
    t0 = time.time()
    with Phases() as phases:
        paths(output)  # validates the output name before any work
        options = resolve(quant, opt, overrides)
        tgt = resolve_target(target)
        kernel = pick_kernel(options.optimization.kernel, tgt)
        _check_input(model, options)
        _check_calibration_data(calibration_data, options)
        executor = executor_for(cluster)  # connects now: an unreachable cluster fails before the export
        loaded = import_model(model, tokenizer, options.optimization.kv_cache, keep_torch=_needs_torch(options))
        windows = _calibration_windows(options, loaded.tokenizer) if calibration_data is None else 0
        mod = merge_functions(loaded.imported, loaded.extra) if loaded.extra else loaded.imported.mod
        weights, rewrite, plan, tuning = Weights(loaded.imported.params), None, None, None
        if options.quant.rewrite:  # what can fail fails now, not after calibration and fitting
            check_group(options.bcq(), loaded.imported.mod["main"], loaded.imported.params, tuple(options.quant.skip))
            preflight(mod, tgt, options.optimization.share_kv, options.optimization.attention)
            knobs, tuning = _knob_source(kernel, options, db, tgt, loaded.imported)
            if calibration_data is not None:
                specs = _input_specs(loaded.imported.mod["main"], loaded.imported.input_names)
                batches = array_batches(calibration_data, specs)
                windows = len(batches)
                logger.info(f"calibration: {windows} feeds from {calibration_data} ({options.calibration.mode})")
            else:
                batches = calibration_batches(
                    loaded.tokenizer, windows, options.calibration.length, loaded.imported.input_names
                )
            with using(executor):
                plan = fit_weights(loaded, options, tgt, batches)
            loaded.torch_model = None  # nothing after the fits needs the source model: free it now
            weights.params = {**weights.params, **plan.norms}
            rewrite = _rewrite(options, plan, kernel, knobs, tuple(loaded.extra), keep_dequantized)
        cached = bool(loaded.extra)
        pipeline = Pipeline(
            tgt,
            rewrite=rewrite,
            weights=weights,
            decode_one=cached,
            prefill_last=cached,
            max_context=(loaded.kv_spec or {}).get("max_context"),
        )
        with phase("rewrite + lower"):
            mod = pipeline.run(mod, "rewrite", "decode")
        params, report, extra = weights.params, weights.report, _functions(loaded, mod)
        loaded.imported.params = params  # the float weights the rewrite replaced are garbage now
        for other in loaded.extra.values():
            other.params = {}
        logger.info(f"building for {tgt.export().get('mcpu', '')} ...")
        tb = time.time()
        with phase("build"):
            ex = build(mod, tgt, records(db, tgt), options.optimization.share_kv, options.optimization.attention)
        logger.info(f"built in {time.time() - tb:.1f}s")
        manifest = _manifest(loaded, options, tgt, kernel, mod, params, extra, report, plan, tuning, windows)
        if manifest["calibration"]:
            manifest["calibration"]["fits_on"] = executor.name
        if calibration_data is not None and manifest["calibration"]:
            manifest["calibration"].update(text=None, tokens_per_window=None, arrays=Path(calibration_data).name)
        manifest["phases"] = list(phases.rows)  # up to the build: the write is the manifest's own
        with phase("write"):
            so, manifest = _write(output, ex, mod, params, loaded.tokenizer, manifest)
        tok = ", .tokenizer/" if loaded.tokenizer else ""
        logger.info(f"wrote {so} (+ .params, .json{tok}) in {time.time() - t0:.1f}s total")
    logger.info(f"phases (seconds / peak RSS): {phases.summary()}")
    return CompileResult(so, manifest, report, phases.rows)


def _rewrite(options: CompileOptions, plan, kernel: str, knobs, also: tuple, keep_dequantized: bool) -> Rewrite:
    """The rewrite phase's inputs: the fits of ``plan`` and the options' storage and switches."""
    return Rewrite(
        options.bcq(),
        fitted=plan.fitted,
        layer_bits=plan.layer_bits,
        allocation=plan.allocation,
        skip=tuple(options.quant.skip),
        kernel=kernel,
        knobs=knobs,
        also=also,
        stack_siblings=options.optimization.stack_siblings,
        keep_dequantized=keep_dequantized,
    )


@dataclass
class _Signature:
    input_names: list
    output_names: list


def _functions(loaded, mod) -> dict:
    """The functions beside ``main`` by name -> the import whose inputs and outputs they have:
    ``decode`` and its ``decode_one`` and ``decode_step``, ``prefill_last`` (``main``'s), and
    ``kv_resize`` (the caches and their new capacity in, the caches out)."""
    from .relax_passes.kv_cache_in_place import NAME as STEP
    from .relax_passes.kv_cache_in_place import RESIZE
    from .relax_passes.last_position_logits import NAME as LAST
    from .relax_passes.specialize_decode import NAME

    if not loaded.extra:
        return {}
    have = {gv.name_hint for gv, _ in mod.functions_items()}
    decode = loaded.extra["decode"]
    out = {**loaded.extra, NAME: decode, **({LAST: loaded.imported} if LAST in have else {})}
    if STEP in have:
        past = [n for n in decode.input_names if n not in ("input_ids", "attention_mask")]
        out[STEP] = decode
        out[RESIZE] = _Signature([*past, "capacity"], past)
    return out


def _check_input(model: str, options: CompileOptions) -> None:
    """What an ONNX input cannot do, said before the export and import."""
    if options.calibration.tune_scales and is_onnx(model):
        raise ValueError(
            f"scale tuning needs the source model's gradients: '{model}' is an ONNX file "
            "(compile the Hugging Face model, or pass tune_scales=0)"
        )


def _needs_torch(options: CompileOptions) -> bool:
    """Whether a calibration step runs the source model in torch (one-pass Hessians, Fisher weights,
    scale tuning)."""
    q, c = options.quant, options.calibration
    return (
        q.rewrite
        and c.windows != 0
        and (c.mode == "one-pass" or (q.avg_bits is not None and c.loss_aware) or c.tune_scales > 0)
    )


def _check_calibration_data(calibration_data, options: CompileOptions) -> None:
    """A ``calibration_data`` file the options would ignore or contradict is an error, not a silent no-op."""
    if calibration_data is None:
        return
    if not options.quant.rewrite:
        raise ValueError(
            f"calibration_data ({calibration_data}): the quantization preset rewrites no weight, "
            "so there is nothing to calibrate; drop the file or pick a quantizing preset"
        )
    if options.calibration.windows is not None:
        raise ValueError(
            f"calibration_data ({calibration_data}) and windows={options.calibration.windows} both set: "
            "the file's samples are the calibration set; drop windows"
        )
    if not Path(calibration_data).is_file():
        raise ValueError(f"calibration_data: no such file {calibration_data}")


def _calibration_windows(options: CompileOptions, tokenizer) -> int:
    """The calibration windows asked for, or the default: 128 when there is a tokenizer to read text."""
    q, c = options.quant, options.calibration
    if c.windows is not None:
        return c.windows
    windows = DEFAULT_CALIB_WINDOWS if (q.rewrite and tokenizer is not None) else 0
    if q.rewrite:
        logger.info(
            f"calibration: {windows} windows x {c.length} wiki tokens ({c.mode})"
            if windows
            else "no tokenizer: weight-only fit (pass tokenizer= / --tokenizer to calibrate on text)"
        )
    return windows


def _knob_source(kernel: str, options: CompileOptions, db, target, imported):
    """(knobs callback for the rewrite, manifest summary dict filled in as kernels are looked up). With
    ``tune``, the kernel keys missing from the database are tuned here, at once: before the fits,
    whose BLAS and torch threads would otherwise still be busy on the other core while a kernel is
    timed (docs/ENGINEERING.md). Keys the rewrite asks for beyond them are tuned when asked.
    ``int8_batch`` False keeps M > 1 on the LUT path (TuningDB.knobs)."""
    tune, int8_batch = options.optimization.tune, options.optimization.int8_batch
    summary = {"db": None, "from_db": 0, "shipped": 0, "default": 0, "tuned_now": 0, "int8_batch": int8_batch}
    if not BACKENDS[kernel].tunable:
        return None, summary
    from .tuning.database import TuningDB
    from .tuning.search import tune_missing

    tdb = TuningDB.open(db, target=target)
    summary["db"], summary["shipped_db"] = str(tdb.path), tdb.shipped_from
    keys = _kernel_keys(imported, options.bcq(), options.quant.skip, options.quant.avg_bits, kernel, tune)
    if tune and keys:
        summary["tuned_now"] += tune_missing(tdb, list(keys))

    def knobs(*key):
        if tune and tdb.get(*key) is None:
            summary["tuned_now"] += tune_missing(tdb, [key])
        summary["from_db" if tdb.get(*key) else "shipped" if tdb.get_shipped(*key) else "default"] += 1
        return tdb.knobs(*key, int8=int8_batch)

    return knobs, summary


def _kernel_keys(imported, cfg, skip, avg_bits, kernel: str, tune: bool) -> list[tuple]:
    """The AVX2 kernel keys the rewrite of ``imported`` will look up (every width a mixed-bit
    allocation may pick), for tuning them up front; empty unless tuning the AVX2 kernel."""
    if not BACKENDS[kernel].tunable or not tune or cfg.layout == "column":
        return []
    from .quant.allocate import CHOICES
    from .relax_passes.rewrite_lut_matmul import sibling_groups, weight_matmul_shapes
    from .tuning.jobs import kernel_keys

    main = imported.mod["main"]
    return kernel_keys(
        weight_matmul_shapes(main, imported.params, ()),
        cfg,
        tuple(skip),
        CHOICES if avg_bits is not None else None,
        sibling_groups(main, imported.params, ()),
    )


def _manifest(loaded, options, tgt, kernel, mod, params, extra, report, plan, tuning, windows) -> dict:
    """What the artifact records: where it came from, every resolved option, the functions' signatures
    and what the rewrite did, layer by layer."""
    import tvm

    imports = {"main": loaded.imported, **extra}
    functions = {
        name: {
            "inputs": _input_specs(mod[name], imports[name].input_names),
            "outputs": imports[name].output_names,
            "params": [v.name for v in mod[name].params[int(mod[name].attrs["num_input"]) :]],
        }
        for name in imports
    }

    q = options.quant
    rewrite = q.rewrite
    imported = loaded.imported
    vocab_size, eos_ids = _vocab_and_eos(imported, loaded.tokenizer)
    before, after = report.weight_bytes() if report else (0, 0)
    return {
        "model": loaded.name,
        "source": loaded.source,
        "shiftadd_version": __version__,
        "tvm_version": tvm.__version__,
        "target": target_dict(tgt),
        "options": options.manifest(),
        "rewrite": rewrite,
        "kernel": kernel if rewrite else None,
        "tuning": tuning if rewrite else None,
        "quant": asdict(options.bcq()) if rewrite else None,
        "calibration": {
            "windows": windows,
            "tokens_per_window": options.calibration.length,
            "text": "wiki calib split",
            **plan.calibration,
        }
        if plan and plan.calibration
        else None,
        "scale_tuning": plan.scale_tuning if plan else None,
        "avg_bits": report.average_bits() if report else None,
        "allocation": {"budget": q.avg_bits, "allocator": q.allocator, "predicted_error": plan.predicted_error}
        if q.avg_bits is not None and rewrite
        else None,
        "skip": list(q.skip) if rewrite else [],
        "inputs": _input_specs(mod["main"], imported.input_names),
        "outputs": imported.output_names,
        "params": list(params),
        "functions": functions,
        "kv_cache": loaded.kv_spec,
        "tokenizer": loaded.tokenizer is not None,
        "vocab_size": vocab_size,
        "eos_token_ids": eos_ids,
        "matmuls_rewritten": len(report.rewritten) if report else 0,
        "matmuls_kept": len(report.kept) if report else None,
        "matmul_weight_bytes": {"before": before, "after": after} if report else None,
        "layers": [
            {
                "name": r.name,
                "k": r.k,
                "n": r.n,
                "bits": r.bits,
                "rel_error": round(r.rel_error, 6),
                "bytes": r.bytes_after,
            }
            for r in report.rewritten
        ]
        if report
        else [],
    }


def _write(output, ex, mod, params, tokenizer, manifest) -> tuple[Path, dict]:
    """The .so, params, tokenizer and manifest, staged and renamed into place (never half an artifact)."""
    import tvm

    with ArtifactWriter(output) as w:
        export(ex, str(w.staged("so")), mod)
        # np.asarray, not np.ascontiguousarray: that makes a 0-d weight (a scalar initializer) 1-d
        blob = tvm.runtime.save_param_dict({k: tvm.runtime.tensor(np.asarray(v, order="C")) for k, v in params.items()})
        w.staged("params").write_bytes(blob)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(w.staged("tokenizer")))
        manifest = w.commit(manifest)
    return w.paths["so"], manifest


def _input_specs(func, names: list[str] | None = None) -> list[dict]:
    """Name (the ONNX graph's: TVM's importer turns dots into underscores), dtype and shape of each input."""
    import tvm
    from tvm import relax

    n_in = int(func.attrs["num_input"])
    names = names or [v.name for v in func.params[:n_in]]

    def dims(values):
        return [str(int(d)) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in values]

    return [
        {"name": name, "dtype": "shape", "shape": dims(v.ty.values)}  # a shape argument (kv_resize's)
        if isinstance(v.ty, relax.ShapeType)
        else {"name": name, "dtype": str(v.ty.dtype), "shape": dims(v.ty.shape.values)}
        for name, v in zip(names, func.params[:n_in])
    ]


def _vocab_and_eos(imported, tokenizer):
    """Vocabulary size (rows of the embedding table ``input_ids`` index) and end-of-text ids."""
    vocab = None
    if tokenizer is not None:
        vocab = len(tokenizer)
    rows = embedding_rows(imported.mod["main"], imported.input_names)
    if rows is not None:
        vocab = rows
    eos = []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = [int(tokenizer.eos_token_id)]
    return vocab, eos
