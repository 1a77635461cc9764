"""Plan the reparameterization of every weight matmul before the rewrite: calibration (Hessians),
per-layer bit allocation, and the fits themselves (the rewrite pass then only packs and emits).

    plan = plan_fit(imported, cfg, target=tgt, batches=feeds, mode="sequential", avg_bits=2.5)
    Rewrite(cfg, fitted=plan.fitted, layer_bits=plan.layer_bits)  # relax_passes.pipeline: the rewrite phase
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..config import ALLOCATORS
from ..phases import phase
from ..quant import BCQConfig
from ..quant.allocate import (
    CHOICES,
    LayerCost,
    allocate_budget,
    allocate_ratio,
    allocation_table,
    average_bits,
    sensitivity,
)
from ..quant.gptq import fit_layer
from ..quant.refit import row_errors

logger = logging.getLogger(__name__)

ALLOCATION_REFITS = 1  # scale refits of the fits that predict each layer's error per bit width
_ROWS_MEMO: dict = {}  # memo key -> {(weight name, bits): per-row output errors}


@dataclass
class Allocation:
    """Bits per layer chosen for an average-bits budget, with the paper's 80/20-style rule beside it."""

    budget: float
    allocator: str
    bits: dict[str, int]
    costs: list[LayerCost]
    alternative: dict[str, int]  # the other allocator at the same budget, for comparison
    seconds: float = 0.0

    def predicted_error(self, bits: dict[str, int] | None = None) -> float:
        bits = bits or self.bits
        return sum(c.errors[bits[c.name]] for c in self.costs)

    def table(self) -> str:
        other = "ratio" if self.allocator == "budget" else "budget"
        head = (
            f"Average-bits budget {self.budget}: allocator '{self.allocator}' -> "
            f"{average_bits(self.costs, self.bits):.4f} bits, predicted error {self.predicted_error():.4g}; "
            f"'{other}' -> {average_bits(self.costs, self.alternative):.4f} bits, predicted error "
            f"{self.predicted_error(self.alternative):.4g}\n\n"
        )
        return head + allocation_table(
            self.costs, {f"bits ({self.allocator})": self.bits, f"bits ({other})": self.alternative}
        )

    def plot(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = np.arange(len(self.costs))
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, 0.06 * len(x) + 2), 5), sharex=True)
        a1.step(x, [self.bits[c.name] for c in self.costs], where="mid", label=self.allocator)
        a1.step(
            x,
            [self.alternative[c.name] for c in self.costs],
            where="mid",
            ls="--",
            label="ratio" if self.allocator == "budget" else "budget",
        )
        a1.set_ylabel("bits")
        a1.legend(loc="upper right")
        a1.set_title(f"bit allocation, budget {self.budget} bits/weight")
        for b in sorted(self.costs[0].errors):
            a2.semilogy(x, [max(c.errors[b], 1e-30) for c in self.costs], ".", label=f"{b}-bit")
        a2.set_ylabel("predicted error")
        a2.set_xlabel("weight matmul (model order)")
        a2.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def write(self, md_path) -> None:
        md = Path(md_path)
        md.write_text(self.table() + "\n")
        self.plot(md.with_suffix(".png"))


@dataclass
class FitPlan:
    fitted: dict = field(default_factory=dict)  # weight name -> BCQWeight
    layer_bits: dict | None = None
    allocation: Allocation | None = None
    calibration: dict | None = None  # what the manifest records
    scale_tuning: dict | None = None  # likewise, when the scales were tuned end to end (scale_tuning.py)
    norms: dict = field(default_factory=dict)  # norm gains tuned with the scales (param name -> array)
    predicted_error: str | None = None  # what the bit allocation minimised


def _layers(imported, skip):
    from ..relax_passes.capture_matmul_inputs import capture_matmul_inputs

    _, caps = capture_matmul_inputs(imported.mod, imported.params, tuple(skip), require=False)
    out = []
    for c in caps:
        if c.is_param:
            v = imported.params[c.name]
            out.append((c.name, np.ascontiguousarray(v if c.transposed else v.T, np.float32)))
    return out


def allocate_bits(
    layers,
    cfg: BCQConfig,
    budget: float,
    hessians: dict | None,
    allocator: str = "budget",
    choices=CHOICES,
    fisher: dict | None = None,
    fits: dict | None = None,
    memo_key=None,
) -> Allocation:
    """Measure every layer's predicted error at each bit width and allocate.

    With ``hessians`` the prediction is the output error of the calibrated fit at that width (error
    feedback, at most ``ALLOCATION_REFITS`` scale refits, bounding the cost of fitting three widths);
    the fits are stored in ``fits`` (weight name -> {bits: BCQWeight}) when given, and serve as the
    final fits when ``cfg.refits`` is no more. Without ``hessians``: the plain weight error of
    weight-only fits. ``fisher`` (weight name -> [N] loss sensitivity per output, calibration/fisher.py)
    makes the prediction loss-aware: row errors weighted by it. ``memo_key`` (the content of model,
    calibration and config) keeps the per-row errors in this process, so further budgets of one model
    (bench/quality.py) skip the fits."""
    from tqdm import tqdm

    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got '{allocator}'")
    t0 = time.time()
    memo = _ROWS_MEMO.get(memo_key) if memo_key is not None else None
    if memo is not None:
        logger.info("bit allocation: reusing the per-width fit errors measured earlier in this process")
    rows_of = {}
    costs = []
    batched = {}  # bits -> {name: fit}: calibrated row-group fits of every layer at once (quant/gptq_rows.py)
    if hessians and cfg.layout == "row-group" and memo is None:
        from ..quant.gptq_rows import fit_rows

        jobs = [(name, w) for name, w in layers if hessians.get(name) is not None]
        for b in choices:
            fitted = fit_rows(
                [(w, hessians[name]) for name, w in jobs],
                replace(cfg, bits=b, refits=min(cfg.refits, ALLOCATION_REFITS)),
            )
            batched[b] = {name: bw for (name, _), bw in zip(jobs, fitted, strict=True)}
    for name, w in tqdm(
        layers,
        desc="bit allocation",
        unit="matmul",
        disable=not logger.isEnabledFor(logging.INFO) or memo is not None,
        leave=False,
    ):
        h = hessians.get(name) if hessians else None
        f = fisher.get(name) if fisher else None
        if f is not None and np.shape(f) != (w.shape[0],):
            raise ValueError(
                f"fisher weights of {name}: shape [{w.shape[0]}] (one per output row) expected, got {list(np.shape(f))}"
            )
        c = LayerCost(name, int(w.size), score=sensitivity(w, h if h is not None else np.eye(w.shape[1])))
        for b in choices:
            rows = memo.get((name, b)) if memo is not None else None
            if rows is None:
                bw = batched.get(b, {}).get(name)
                if bw is None:
                    bw = (
                        fit_layer(w, replace(cfg, bits=b, refits=min(cfg.refits, ALLOCATION_REFITS)), h)
                        if h is not None
                        else fit_layer(w, replace(cfg, bits=b, rounds=min(cfg.rounds, 3)))
                    )
                d = torch.from_numpy(np.asarray(w, np.float64) - bw.dequantize().astype(np.float64))
                rows = (
                    row_errors(d, torch.zeros_like(d), torch.from_numpy(np.asarray(h, np.float64)))
                    if h is not None
                    else (d * d).sum(1)
                ).numpy()
                if fits is not None and h is not None and cfg.refits <= ALLOCATION_REFITS:
                    fits.setdefault(name, {})[b] = bw
            rows_of[(name, b)] = rows
            c.errors[b] = float((rows * np.asarray(f, np.float64)).sum() if f is not None else rows.sum())
        costs.append(c)
    if memo_key is not None:
        _ROWS_MEMO.clear()  # one model's errors at a time
        _ROWS_MEMO[memo_key] = rows_of
    ours = allocate_budget(costs, budget, choices)
    lo = min(max(int(np.floor(budget)), min(choices)), max(choices) - 1)  # the paper's rule mixes two widths
    paper = allocate_ratio(costs, frac_high=min(budget - lo, 1.0), low=lo, high=lo + 1)
    bits, alt = (ours, paper) if allocator == "budget" else (paper, ours)
    a = Allocation(budget, allocator, bits, costs, alt, time.time() - t0)
    hist = {b: sum(c.params for c in costs if bits[c.name] == b) for b in choices}
    logger.info(
        f"allocated {len(costs)} layers for {budget} bits/weight ({allocator}): "
        + ", ".join(f"{b}-bit {100 * n / sum(hist.values()):.1f} %" for b, n in hist.items())
        + f" of weights, predicted error {a.predicted_error():.4g} vs {a.predicted_error(alt):.4g} "
        f"({'ratio' if allocator == 'budget' else 'budget'}) in {a.seconds:.1f}s"
    )
    return a


def _one_pass(imported, batches, target, skip, layers, source_model):
    """One-pass Hessians: on the source model in torch where it has every weight as a linear module,
    else through the Relax capture of our float build."""
    from .hessians import Calibration, calibrate

    if source_model is not None:
        from .torch_hessians import hessians_from_torch

        got = hessians_from_torch(source_model, batches, layers)
        if got is not None:
            h, tokens, forwards, seconds = got
            logger.info(
                f"calibrated {len(h)} matmuls (one-pass, on the source model in torch, {forwards} forwards) "
                f"on {tokens} tokens in {seconds:.1f}s"
            )
            return Calibration(h, tokens, "one-pass", forwards, seconds)
        logger.info("calibration: not every weight is a linear layer of the source model; through our float build")
    return calibrate(imported, batches, target, skip, mode="one-pass")


def plan_fit(
    imported,
    cfg: BCQConfig,
    target,
    skip=("lm_head",),
    batches: list | None = None,
    mode: str = "one-pass",
    avg_bits: float | None = None,
    allocator: str = "budget",
    fisher: dict | None = None,
    source_model=None,
) -> FitPlan:
    """Fits for every weight matmul: weight-only without ``batches``, error feedback with them
    (``mode`` 'sequential' or 'one-pass'); ``avg_bits`` switches to a per-layer allocation, on
    loss-aware predicted errors when ``fisher`` (shiftadd/calibration/fisher.py) is given.
    ``source_model``: the Hugging Face model the graph was exported from; one-pass Hessians are then
    measured on it in torch (calibration/torch_hessians.py) where every weight is one of its linears."""
    from .hessians import calibrate

    plan = FitPlan()
    layers = _layers(imported, skip)
    h0 = None
    cal = None
    if batches is not None and (avg_bits is not None or mode == "one-pass"):
        with phase("calibration"):
            cal = _one_pass(imported, batches, target, skip, layers, source_model)
        h0 = cal.hessians
    fits = {}
    if avg_bits is not None:
        from dataclasses import asdict

        from .hessians import _memo_key

        key = (
            (
                _memo_key(imported, batches, target, tuple(skip)),  # the fits' config, whatever its bits
                tuple(v for k, v in asdict(cfg).items() if k != "bits"),
            )
            if batches
            else None
        )
        with phase("bit allocation"):
            plan.allocation = allocate_bits(
                layers,
                cfg,
                avg_bits,
                h0,
                allocator,
                fisher=fisher,
                fits=fits if mode == "one-pass" else None,
                memo_key=key,
            )
        plan.layer_bits = plan.allocation.bits

    def cfg_of(name):
        b = (plan.layer_bits or {}).get(name, cfg.bits)
        return cfg if b == cfg.bits else replace(cfg, bits=b)

    if batches is None:
        return plan  # the rewrite pass fits weight-only with layer_bits
    if mode == "sequential":
        with phase("calibration + fit (sequential)"):
            cal2 = calibrate(
                imported, batches, target, skip, mode="sequential", fit=lambda name, w, h: fit_layer(w, cfg_of(name), h)
            )
        plan.fitted = cal2.fitted
        forwards, seconds = cal2.forwards + (cal.forwards if cal else 0), cal2.seconds + (cal.seconds if cal else 0)
        tokens = cal2.tokens
    else:
        t0 = time.time()
        todo = []
        for name, w in layers:
            done = fits.get(name, {}).get(cfg_of(name).bits)
            if done is not None:
                plan.fitted[name] = done
            else:
                todo.append((name, w))
        with phase("fit"):
            plan.fitted.update(fit_all(todo, cfg_of, h0))
        forwards, seconds, tokens = cal.forwards, cal.seconds + time.time() - t0, cal.tokens
    plan.calibration = {"mode": mode, "tokens": tokens, "forwards": forwards, "seconds": round(seconds, 1)}
    return plan


def fit_all(layers, cfg_of, hessians) -> dict:
    """Calibrated fits of ``layers`` ((name, weight) pairs): row-group fits batched by config
    (quant/gptq_rows.py: Q/K/V-style siblings joined, same-shape matrices stacked), other layouts one
    by one. Progress in weights, with an ETA."""
    from tqdm import tqdm

    from ..quant.gptq_rows import fit_rows

    t0 = time.time()
    out = {}
    by_cfg: dict = {}
    for name, w in layers:
        by_cfg.setdefault(cfg_of(name), []).append((name, w))
    total = sum(int(np.size(w)) for _, w in layers)
    with tqdm(
        total=total,
        desc="error-feedback fit",
        unit="weight",
        unit_scale=True,
        leave=False,
        disable=not logger.isEnabledFor(logging.INFO),
    ) as bar:
        for cfg, group in by_cfg.items():
            if cfg.layout == "row-group":
                fitted = fit_rows([(w, hessians[name]) for name, w in group], cfg, progress=bar.update)
                out.update((name, bw) for (name, _), bw in zip(group, fitted, strict=True))
                continue
            for name, w in group:
                out[name] = fit_layer(w, cfg, hessians[name])
                bar.update(int(np.size(w)))
    if layers:
        logger.info(
            f"fitted {len(layers)} matmuls (error feedback, {total / 1e6:.1f}M weights) in {time.time() - t0:.1f}s"
        )
    return out


TUNE_LEN = 256  # tokens per scale-tuning window


def fit_weights(loaded, options, target, batches) -> FitPlan:
    """Every weight matmul's fit for a compile: the loss sensitivity of each output (Fisher, from the
    source model) when bits are allocated per layer, the calibrated fits of :func:`plan_fit`, then
    the end-to-end scale tuning the options ask for. ``loaded``: frontend.LoadedModel (its
    torch model kept when a step needs it), ``options``: config.CompileOptions."""
    q, c = options.quant, options.calibration
    cfg = options.bcq()
    fisher = None
    if q.avg_bits is not None and batches and c.loss_aware:
        if loaded.torch_model is None:
            logger.info(
                "loss-aware allocation needs the source model's gradients: ONNX input, allocating on "
                "output error (compile the Hugging Face model for the loss-aware allocation)"
            )
        else:
            from .fisher import output_fisher

            with phase("fisher"):
                fisher = output_fisher(loaded.torch_model, batches, names=set(loaded.imported.params))
    plan = plan_fit(
        loaded.imported,
        cfg,
        target,
        skip=q.skip,
        batches=batches,
        mode=c.mode,
        avg_bits=q.avg_bits,
        allocator=q.allocator,
        fisher=fisher,
        source_model=loaded.torch_model,
    )
    plan.predicted_error = (
        "loss-aware (Fisher-weighted output error)"
        if fisher is not None
        else ("output error" if batches else "weight error")
    )
    if c.tune_scales:
        if not batches:
            raise ValueError("scale tuning needs calibration windows (windows > 0 and a tokenizer)")
        with phase("scale tuning"):
            _tune_scales(loaded, plan, batches, cfg, c.tune_scales)
    return plan


def _tune_scales(loaded, plan: FitPlan, batches, cfg: BCQConfig, steps: int) -> None:
    """End-to-end scale tuning of ``plan.fitted`` and the norm gains (in place) on the source model."""
    from .scale_tuning import tune_scales

    model, imported = loaded.torch_model, loaded.imported
    windows = _tuning_windows(loaded.tokenizer, batches, getattr(model.config, "max_position_embeddings", None))
    tuned = tune_scales(model, plan.fitted, windows, cfg.rounder(), steps, available=set(imported.params))
    for name, gain in tuned.norms.items():
        want = np.shape(imported.params[name])
        if np.shape(gain) != want:
            raise ValueError(
                f"scale tuning: norm gain {name} has shape {list(np.shape(gain))}, the graph's {list(want)}"
            )
    plan.fitted, plan.norms = tuned.fitted, dict(tuned.norms)
    plan.scale_tuning = {
        "steps": steps,
        "norm_gains": len(tuned.norms),
        "kl_before": round(tuned.kl_before, 5),
        "kl_after": round(tuned.kl_after, 5),
        "seconds": round(tuned.seconds, 1),
    }


def _tuning_windows(tokenizer, batches, max_len: int | None = None) -> np.ndarray:
    """The calibration text's tokens (as many as the calibration windows hold) re-cut into windows of
    TUNE_LEN: later positions see longer contexts, as in use, and longer windows tuned better than the
    calibration's own (docs/ENGINEERING.md, docs/QUALITY.md)."""
    from .text import token_windows, wiki_split

    length = min(TUNE_LEN, max_len or TUNE_LEN)
    tokens = sum(int(np.asarray(b["input_ids"]).size) for b in batches)
    return token_windows(tokenizer, wiki_split("calib"), length, max(1, tokens // length))
