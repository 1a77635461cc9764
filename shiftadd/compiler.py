"""``shiftadd.compile``: model (HF id/path, GGUF, 'smollm2', or ONNX file) -> artifact (.so + params)."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .artifact import ArtifactWriter, paths
from .quant import BCQConfig
from .util import log


DEFAULT_CALIB_WINDOWS = 128  # x 128 tokens (docs/QUALITY.md: 16 windows over-fit the Hessians of K = 1536 inputs)


@dataclass
class CompileResult:
    so: Path
    manifest: dict
    report: object | None  # RewriteReport, or None when the rewrite is off


def _is_onnx(model: str) -> bool:
    return str(model).lower().endswith(".onnx")


def _input_specs(func, names: list[str] | None = None) -> list[dict]:
    """Name (the ONNX graph's: TVM's importer turns dots into underscores), dtype and shape of each input."""
    import tvm

    n_in = int(func.attrs["num_input"])
    names = names or [v.name for v in func.params[:n_in]]
    return [{"name": name, "dtype": str(v.ty.dtype),
             "shape": [str(int(d)) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in v.ty.shape.values]}
            for name, v in zip(names, func.params[:n_in])]


def _vocab_and_eos(imported, tokenizer):
    """Vocabulary size (rows of the embedding table feeding ``input_ids``) and end-of-text ids."""
    vocab = None
    if tokenizer is not None:
        vocab = len(tokenizer)
    emb = [v.shape[0] for k, v in imported.params.items() if "embed" in k or k.endswith("wte.weight")]
    if emb:
        vocab = int(emb[0])
    eos = []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = [int(tokenizer.eos_token_id)]
    return vocab, eos


def build(mod, target, db=None, share_kv: bool = True, attention: bool = True):
    """Relax module -> VM executable, with the CPU pipeline (legalize, fold, fuse); operators the
    MetaSchedule database beside the tuning database ``db`` holds get its schedules, the rest ours.
    ``share_kv``: grouped-query attention reads each key/value head once (relax_passes/share_kv_heads);
    ``attention``: attention over the KV cache runs our kernels (scores and values read the cache in
    place, softmax with the mask fused in; float_tuning.lower), with the knob the tuning database
    ``db`` holds for each (``shiftadd tune``), else the default."""
    import tvm
    from tvm import relax

    from .schedules.default_cpu import schedule_unscheduled
    from .schedules.float_tuning import apply_float, lower
    from .schedules.tuning import TuningDB

    if uses_avx2_kernel(mod):  # in-memory runs resolve the micro-kernel from this process
        from .schedules import lut_avx2

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
        from .schedules import lut_avx2

        lut_avx2.export(ex, path)
    else:
        ex.export_library(path)


def _knob_source(kernel: str, tune: bool, db, target=None, keys=(), int8_batch: bool = True):
    """(knobs callback for the rewrite, manifest summary dict filled in as kernels are looked up).
    With ``tune``, the kernel ``keys`` missing from the database are tuned here, at once: before
    the fits, whose BLAS and torch threads would otherwise still be busy on the other core while a
    kernel is timed (compile --tune then picked single-thread splits that were 1.4x slower in the
    decode step). Keys the rewrite asks for beyond them are tuned when asked. ``int8_batch`` False
    keeps M > 1 on the LUT path (TuningDB.knobs)."""
    summary = {"db": None, "from_db": 0, "default": 0, "tuned_now": 0, "int8_batch": int8_batch}
    if kernel != "avx2":
        return None, summary
    from .schedules.tuning import TuningDB, tune_missing

    tdb = TuningDB.open(db, target=target)
    summary["db"] = str(tdb.path)
    if tune and keys:
        summary["tuned_now"] += tune_missing(tdb, list(keys))

    def knobs(*key):
        if tune and tdb.get(*key) is None:
            summary["tuned_now"] += tune_missing(tdb, [key])
        summary["from_db" if tdb.get(*key) else "default"] += 1
        return tdb.knobs(*key, int8=int8_batch)

    return knobs, summary


def _kernel_keys(imported, cfg, skip, avg_bits, kernel: str, tune: bool) -> list[tuple]:
    """The AVX2 kernel keys the rewrite of ``imported`` will look up (every width a mixed-bit
    allocation may pick), for tuning them up front; empty unless tuning the AVX2 kernel."""
    if kernel != "avx2" or not tune or cfg.layout == "column":
        return []
    from .quant.allocate import CHOICES
    from .relax_passes.rewrite_lut_matmul import sibling_groups, weight_matmul_shapes
    from .tune import kernel_keys

    main = imported.mod["main"]
    return kernel_keys(weight_matmul_shapes(main, imported.params, ()), cfg, tuple(skip),
                       CHOICES if avg_bits is not None else None, sibling_groups(main, imported.params, ()))


def pick_kernel(kernel: str, target) -> str:
    """'auto' -> 'avx2' on a target with AVX2/FMA/F16C, else the portable float-table kernel."""
    from .relax_passes.rewrite_lut_matmul import KERNELS
    from .schedules.lut_avx2 import target_supported

    if kernel == "auto":
        return "avx2" if target_supported(target) else "f32"
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: expected 'auto' or one of {', '.join(KERNELS)}")
    if kernel == "avx2" and not target_supported(target):
        raise ValueError("kernel 'avx2' needs a target with AVX2, FMA and F16C "
                         f"(target mcpu {target.attrs.get('mcpu', '?')!r} lacks them)")
    return kernel


def import_model(model: str, tokenizer=None, kv_cache: bool = True):
    """Export (Hugging Face models) and import ``model``: (imported main, further functions by name,
    KV cache geometry or None, tokenizer, source text, model name). With ``kv_cache`` an HF model is
    exported twice (prefill ``main`` returning the cache, ``decode`` taking it back)."""
    from .frontend import export_onnx, export_onnx_with_cache, import_onnx, load_hf_model

    source = str(model)
    extra, kv_spec = {}, None  # further functions (name -> ImportedModel) and the KV cache's geometry
    if _is_onnx(model):
        imported = import_onnx(model)
        model_name = Path(model).stem
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            from .frontend import resolve_model

            src = resolve_model(tokenizer)
            kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
            tokenizer = AutoTokenizer.from_pretrained(src.path, **kw)
    else:
        hf_model, tokenizer, src = load_hf_model(model)
        source, model_name = src.display, str(model)
        with tempfile.TemporaryDirectory(prefix="shiftadd-export-") as tmp:
            if kv_cache:
                exported = export_onnx_with_cache(hf_model, tmp)
                kv_spec = exported.spec()
                imported = import_onnx(exported.prefill)
                extra = {"decode": import_onnx(exported.decode)}
            else:
                imported = import_onnx(export_onnx(hf_model, Path(tmp) / "model.onnx"))
            del hf_model
    return imported, extra, kv_spec, tokenizer, source, model_name


def _output_fisher(model: str, batches, imported) -> dict:
    """Loss sensitivity of every weight matmul's outputs (shiftadd/fisher.py), from the HF model."""
    from .fisher import output_fisher
    from .frontend import load_hf_model

    hf_model, _, _ = load_hf_model(model)
    return output_fisher(hf_model, batches, names=set(imported.params))


TUNE_LEN = 256  # tokens per scale-tuning window


def _tuning_windows(tokenizer, batches, max_len: int | None = None) -> np.ndarray:
    """The calibration text's tokens (as many as the calibration windows hold) in windows of TUNE_LEN:
    on SmolLM2 at 3 bits, 64 x 256 tokens tuned to 20.00 held-out perplexity, 128 x 128 to 20.43
    (docs/QUALITY.md; later positions see longer contexts, as in use)."""
    from .data import token_windows, wiki_split

    length = min(TUNE_LEN, max_len or TUNE_LEN)
    tokens = sum(int(np.asarray(b["input_ids"]).size) for b in batches)
    return token_windows(tokenizer, wiki_split("calib"), length, max(1, tokens // length))


def _tune_scales(model: str, plan, batches, cfg: BCQConfig, steps: int, imported):
    """End-to-end scale tuning of ``plan.fitted`` (in place) from the HF model; returns TunedScales."""
    from .frontend import load_hf_model
    from .scale_tuning import tune_scales

    hf_model, tokenizer, _ = load_hf_model(model)
    windows = _tuning_windows(tokenizer, batches, getattr(hf_model.config, "max_position_embeddings", None))
    tuned = tune_scales(hf_model, plan.fitted, windows, cfg.rounder(), steps, available=set(imported.params))
    for name, gain in tuned.norms.items():
        want = np.shape(imported.params[name])
        if np.shape(gain) != want:
            raise ValueError(f"scale tuning: norm gain {name} has shape {list(np.shape(gain))}, the graph's "
                             f"{list(want)}")
    plan.fitted = tuned.fitted
    plan.scale_tuning = {"steps": steps, "norm_gains": len(tuned.norms), "kl_before": round(tuned.kl_before, 5),
                         "kl_after": round(tuned.kl_after, 5), "seconds": round(tuned.seconds, 1)}
    return tuned


def compile(model: str, output: str | os.PathLike, bits: int = 3, group: int = 64, apot_terms: int = 3,
            rounds: int = 6, skip: tuple[str, ...] = ("lm_head",), target: str = "cpu", rewrite: bool = True,
            keep_dequantized: bool = False, offset: bool = True, tokenizer=None, calib_windows: int | None = None,
            calib_len: int = 128, calib_mode: str = "one-pass", avg_bits: float | None = None,
            allocator: str = "budget", layout: str = "row-group", block_rows: int = 64,
            kernel: str = "auto", tune: bool = False, db: str | os.PathLike | None = None,
            scale_format: str = "fp16", kv_cache: bool = True, refits: int = 3,
            loss_aware: bool = True, stack_siblings: bool = True, share_kv: bool = True,
            attention: bool = True, tune_scales: int = 0, int8_batch: bool = True,
            tied_scales: bool = False) -> CompileResult:
    """Compile ``model`` into ``output`` (a ``.so`` path; params, manifest and tokenizer go beside it).

    ``calib_windows`` > 0 (default: DEFAULT_CALIB_WINDOWS when the model has a tokenizer, else 0) fits
    every layer with error feedback against input Hessians from that many windows of the packaged
    wiki text (calibration split), in one float pass (``calib_mode='one-pass'``, the default) or block
    by block on the already-quantized model (``'sequential'``: ≈ 18x slower on SmolLM2 and no better
    there, docs/QUALITY.md); row-group fits then alternate ``refits`` output-error refits of their
    scales with the loop (quant/refit.py; 0 = GPTQ codes on weight-fitted scales). ``avg_bits`` (e.g. 2.5)
    allocates 2/3/4 bits per layer under that average (``allocator`` 'budget': exact knapsack on
    predicted error; 'ratio': the paper's rule); ``bits`` is then ignored. The predicted error of a
    layer at each width is the output error of its calibrated fit at that width, weighted per output
    by the loss's sensitivity to it (``loss_aware``: the empirical Fisher from the source model's
    gradients on the calibration text, shiftadd/fisher.py; Hugging Face inputs only, an ONNX input
    allocates on the plain output error). ``tune_scales`` > 0 then tunes every row-group fit's scales
    and offsets (codes fixed, APoT rounding in the loop) and the norm gains end to end for that many
    steps against the float model's next-token distributions on the calibration windows
    (shiftadd/scale_tuning.py; Hugging Face inputs only). ``layout`` picks
    the scale layout (quant/gptq.py): 'row-group' (per row and ``group`` inputs), 'block' (per 8
    inputs x ``block_rows`` rows) or 'column' (per input). ``rewrite=False`` compiles the float model
    unchanged (the exactness baseline). ``kernel`` 'auto' (default) picks the AVX2 int8-table
    micro-kernel on AVX2 targets (T-MAC's technique, schedules/lut_avx2.py) and the float-table TIR
    kernel elsewhere; 'f32' forces the float tables (exact to float rounding). ``scale_format`` 'e5m2'
    stores every scale and offset in one byte (float8 e5m2: APoT values with up to three terms within
    two binary orders) instead of two (float16 APoT with ``apot_terms`` terms). ``tied_scales`` (row-group
    layout) ties each group's plane scales as α·2^-b (the uniform grid of int quantization as sign
    planes, quant.bcq.plane_weights): one stored scale per group instead of ``bits``, fewer bytes per
    weight (4-bit, group 128, e5m2: 4.125 instead of 4.31), and the kernel adds the planes' sums by
    shifts. The AVX2 kernel's
    knobs come from the tuning database ``db`` (default ~/.cache/shiftadd/tuning.json, or
    $SHIFTADD_TUNING_DB); with ``tune`` the kernels missing there are tuned on this machine first and
    saved, so the next compile does no search; without an entry the default knobs serve. Where the CPU
    has AVX-512 VNNI, M > 1 (prefill, batches) may run the int8 path (dequantised weights, int8
    activations per (row, group): a little less exact than the LUT tables); ``int8_batch=False`` keeps
    the LUT path at every M (slower prefill). ``kv_cache``
    (Hugging Face models) exports a prefill graph returning the keys/values and a ``decode`` graph taking
    them back, compiled as functions ``main`` and ``decode`` of the one module over the same weights,
    so generation runs the prompt once and then one token per step. ``stack_siblings``: AVX2 LUT
    calls on one activation (Q/K/V, gate/up) become one call (relax_passes/fuse_sibling_luts.py);
    ``share_kv``: grouped-query attention reads each key/value head once (share_kv_heads.py);
    ``attention``: attention over the KV cache on our kernels (scores and values read the cache in
    place, softmax with the mask fused in; tuned knobs from ``db``). ``tokenizer`` (a model id/path, 'smollm2', or a loaded
    tokenizer) is stored with an ONNX input, for text prompts and calibration.
    """
    import tvm

    from .frontend import merge_functions
    from .relax_passes import rewrite_lut_matmul
    from .targets import resolve_target, target_dict

    t0 = time.time()
    paths(output)  # validates the output name before any work
    cfg = BCQConfig(bits=bits, group=group, apot_terms=apot_terms, rounds=rounds, offset=offset, layout=layout,
                    scale_format=scale_format, refits=refits, tied=tied_scales,
                    block_rows=block_rows)  # validates
    tgt = resolve_target(target)
    kernel = pick_kernel(kernel, tgt)
    from .calibrate import MODES
    from .reparam import ALLOCATORS

    if calib_mode not in MODES:
        raise ValueError(f"calibration mode must be one of {MODES}, got '{calib_mode}'")
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got '{allocator}'")
    if avg_bits is not None:
        from .quant.allocate import CHOICES, _check_budget

        _check_budget(avg_bits, CHOICES)
    if tune_scales < 0:
        raise ValueError(f"tune_scales (steps) must be >= 0, got {tune_scales}")
    if tune_scales and layout != "row-group":
        raise ValueError(f"scale tuning tunes the row-group layout's scales; got layout '{layout}' "
                         "(use --layout row-group, or tune_scales=0)")
    if tune_scales and _is_onnx(model):
        raise ValueError(f"scale tuning needs the source model's gradients: '{model}' is an ONNX file "
                         "(compile the Hugging Face model, or pass tune_scales=0)")
    if calib_windows is not None and (calib_windows < 0 or calib_len < 2):
        raise ValueError(f"calibration needs windows >= 0 and calib_len >= 2, got {calib_windows} and {calib_len}")
    imported, extra, kv_spec, tokenizer, source, model_name = import_model(model, tokenizer, kv_cache)
    vocab_size, eos_ids = _vocab_and_eos(imported, tokenizer)
    if calib_windows is None:
        calib_windows = DEFAULT_CALIB_WINDOWS if (rewrite and tokenizer is not None) else 0
        if rewrite:
            log(f"calibration: {calib_windows} windows x {calib_len} wiki tokens ({calib_mode})" if calib_windows
                else "no tokenizer: weight-only fit (pass tokenizer= / --tokenizer to calibrate on text)")
    mod, params, report, plan, tuning = imported.mod, imported.params, None, None, None
    fisher, batches = None, None
    if extra:
        mod = merge_functions(imported, extra)
    if rewrite:
        from .reparam import plan_fit

        knobs, tuning = _knob_source(kernel, tune, db, tgt, _kernel_keys(imported, cfg, skip, avg_bits, kernel, tune),
                                     int8_batch)

        if calib_windows > 0:
            from .data import token_windows, wiki_split

            if tokenizer is None:
                raise ValueError("calibration on text needs a tokenizer (pass tokenizer= for an ONNX input)")
            ids = token_windows(tokenizer, wiki_split("calib"), calib_len, calib_windows)
            batches = [{"input_ids": row[None], "attention_mask": np.ones_like(row[None])} for row in ids]
        if avg_bits is not None and batches and loss_aware:
            if _is_onnx(model):
                log("loss-aware allocation needs the source model's gradients: ONNX input, allocating on "
                    "output error (compile the Hugging Face model for the loss-aware allocation)")
            else:
                fisher = _output_fisher(model, batches, imported)
        plan = plan_fit(imported, cfg, tgt, skip=tuple(skip), batches=batches, mode=calib_mode,
                        avg_bits=avg_bits, allocator=allocator, fisher=fisher)
        if tune_scales:
            if not batches:
                raise ValueError("scale tuning needs calibration windows (calib_windows > 0 and a tokenizer)")
            tuned = _tune_scales(model, plan, batches, cfg, tune_scales, imported)
            params = {**params, **tuned.norms}
        mod, params, report = rewrite_lut_matmul(mod, params, cfg, skip=tuple(skip), keep_dequantized=keep_dequantized,
                                                 fitted=plan.fitted, layer_bits=plan.layer_bits, kernel=kernel,
                                                 knobs=knobs, also=tuple(extra))
        report.allocation = plan.allocation
        if kernel == "avx2" and stack_siblings:
            from .relax_passes.fuse_sibling_luts import fuse_sibling_luts

            mod, params, fewer = fuse_sibling_luts(mod, params, ("main", *extra), knobs)
            if fewer:
                log(f"stacked sibling LUT calls (Q/K/V, gate/up): {fewer} kernel calls fewer over all functions")
    if extra:  # one sequence, one token: static shapes for everything but the attention over the cache
        from .relax_passes.specialize_decode import NAME, add_decode_one

        mod = add_decode_one(mod)
        extra = {**extra, NAME: extra["decode"]}
    log(f"building for {tgt.export().get('mcpu', '')} ...")
    tb = time.time()
    ex = build(mod, tgt, db, share_kv=share_kv, attention=attention)
    log(f"built in {time.time() - tb:.1f}s")
    func = mod["main"]
    imports = {"main": imported, **extra}
    functions = {name: {"inputs": _input_specs(mod[name], imports[name].input_names),
                        "outputs": imported.output_names if name == "main" else extra[name].output_names,
                        "params": [v.name for v in mod[name].params[int(mod[name].attrs["num_input"]):]]}
                 for name in ("main", *extra)}
    with ArtifactWriter(output) as w:
        export(ex, str(w.staged("so")), mod)
        blob = tvm.runtime.save_param_dict({k: tvm.runtime.tensor(np.ascontiguousarray(v)) for k, v in params.items()})
        w.staged("params").write_bytes(blob)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(w.staged("tokenizer")))
        before, after = report.weight_bytes() if report else (0, 0)
        manifest = {
            "model": model_name,
            "source": source,
            "shiftadd_version": __version__,
            "tvm_version": tvm.__version__,
            "target": target_dict(tgt),
            "rewrite": rewrite,
            "kernel": kernel if rewrite else None,
            "tuning": tuning if rewrite else None,
            "quant": asdict(cfg) if rewrite else None,
            "calibration": {"windows": calib_windows, "tokens_per_window": calib_len, "text": "wiki calib split",
                            **plan.calibration} if plan and plan.calibration else None,
            "scale_tuning": plan.scale_tuning if plan else None,
            "avg_bits": report.average_bits() if report else None,
            "allocation": {"budget": avg_bits, "allocator": allocator,
                           "predicted_error": "loss-aware (Fisher-weighted output error)" if fisher is not None
                           else ("output error" if batches else "weight error")}
            if avg_bits is not None and rewrite else None,
            "skip": list(skip) if rewrite else [],
            "inputs": _input_specs(func, imported.input_names),
            "outputs": imported.output_names,
            "params": list(params),
            "functions": functions,
            "kv_cache": kv_spec,
            "tokenizer": tokenizer is not None,
            "vocab_size": vocab_size,
            "eos_token_ids": eos_ids,
            "matmuls_rewritten": len(report.rewritten) if report else 0,
            "matmuls_kept": len(report.kept) if report else None,
            "matmul_weight_bytes": {"before": before, "after": after} if report else None,
            "layers": [{"name": r.name, "k": r.k, "n": r.n, "bits": r.bits, "rel_error": round(r.rel_error, 6),
                        "bytes": r.bytes_after} for r in report.rewritten] if report else [],
        }
        manifest = w.commit(manifest)
    log(f"wrote {w.paths['so']} (+ .params, .json{', .tokenizer/' if tokenizer else ''}) "
        f"in {time.time() - t0:.1f}s total")
    return CompileResult(w.paths["so"], manifest, report)
