"""Calibration: per weight matmul, the input Hessian ``H = (1/n) Σ x xᵀ`` (float64) over real inputs,
and the error-feedback fit of every layer against it (method.md §3).

Two protocols:

* ``sequential`` (the paper's and GPTQ's): layers are fitted stage by stage in model order (a stage is
  a numbered block such as ``model.layers.7``, or a single matmul when the name has no block index);
  the Hessians of stage i are measured with every earlier stage already replaced by its quantized
  weights, so later layers correct the error of earlier ones. One forward pass over the calibration
  inputs per stage.
* ``one-pass``: all Hessians from one forward pass of the float model; faster, less accurate.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..config import CALIBRATION_MODES

logger = logging.getLogger(__name__)


MODES = CALIBRATION_MODES


@dataclass
class Calibration:
    hessians: dict[str, np.ndarray]  # weight name -> H [K, K] (the one its fit used)
    tokens: int
    mode: str
    forwards: int = 0  # model forward calls made
    seconds: float = 0.0
    fitted: dict = field(default_factory=dict)  # weight name -> BCQWeight, when a fit was given


def stage_of(name: str) -> str:
    """Block a weight belongs to: the name up to its first numeric component (``model.layers.7``)."""
    m = re.match(r"^(.*?[._]\d+)[._]", name)
    return m.group(1) if m else name


def _check_feeds(func, input_names, batches) -> None:
    n_in = len(input_names)
    for i, feed in enumerate(batches):
        if not isinstance(feed, dict):
            raise TypeError(f"calibration batch {i}: expected a dict of input name -> array, got {type(feed).__name__}")
        for var in func.params[:n_in]:
            if var.name not in feed:
                raise ValueError(f"calibration batch {i}: missing input '{var.name}' (model inputs: {input_names})")
            a = np.asarray(feed[var.name])
            want, rank = str(var.ty.dtype), len(var.ty.shape.values)
            if str(a.dtype) != want:
                kind = " token ids" if want == "int64" and var.name in ("input_ids", "attention_mask") else ""
                raise TypeError(f"calibration input '{var.name}': expected {want}{kind}, got {a.dtype}")
            if a.ndim != rank:
                raise ValueError(f"calibration input '{var.name}': expected rank {rank}, got shape {a.shape}")
            if a.size == 0:
                raise ValueError(f"calibration input '{var.name}' in batch {i} is empty")


_MEMO: dict = {}


def _memo_key(imported, batches, target, skip) -> str:
    """Content key of a one-pass calibration: the graph, every weight, every input and the target,
    so compiling several variants of one model in a process (bit widths, budgets) measures once."""
    import hashlib

    import tvm_ffi

    h = hashlib.blake2b(digest_size=20)
    h.update(str(tvm_ffi.structural_hash(imported.mod)).encode())
    h.update(repr((sorted(skip), str(target))).encode())
    for name in sorted(imported.params):
        v = np.asarray(imported.params[name], order="C")
        h.update(f"{name}{v.dtype}{v.shape}".encode())
        h.update(v.reshape(-1).view(np.uint8))
    for feed in batches:
        for name in sorted(feed):
            v = np.asarray(feed[name], order="C")
            h.update(f"{name}{v.dtype}{v.shape}".encode())
            h.update(v.reshape(-1).view(np.uint8))
    return h.hexdigest()


def calibrate(
    imported, batches: list[dict], target, skip=("lm_head",), mode: str = "sequential", fit: Callable | None = None
) -> Calibration:
    """Measure Hessians on ``batches`` (feeds of the model's inputs) and, with ``fit(name, w [N, K],
    H) -> BCQWeight or None``, fit each layer; ``sequential`` needs ``fit`` (it feeds the quantized
    weights forward)."""
    import tvm
    from tqdm import tqdm
    from tvm import relax

    from ..relax_passes.capture_matmul_inputs import capture_matmul_inputs
    from ..relax_passes.pipeline import build
    from ..tuning.records import records

    if mode not in MODES:
        raise ValueError(f"calibration mode must be one of {MODES}, got '{mode}'")
    if mode == "sequential" and fit is None:
        raise ValueError("sequential calibration needs a fit function (it runs the quantized layers)")
    if not batches:
        raise ValueError("calibration: no calibration inputs (empty text or zero windows)")
    func = imported.mod["main"]
    _check_feeds(func, imported.input_names, batches)
    memo = _memo_key(imported, batches, target, skip) if mode == "one-pass" and fit is None else None
    if memo is not None and memo in _MEMO:
        logger.info("calibration: reusing the Hessians measured earlier in this process (same model, inputs, target)")
        return _MEMO[memo]
    mod, caps = capture_matmul_inputs(imported.mod, imported.params, tuple(skip))
    t0 = time.time()
    ex = build(mod, target, records(None, target))  # as the compile builds: the user's tuned records
    dev = tvm.cpu(0)
    vm = relax.VirtualMachine(ex, dev)
    weights = {k: tvm.runtime.tensor(v, dev) for k, v in imported.params.items()}
    feeds = [
        [tvm.runtime.tensor(np.asarray(f[v.name], order="C"), dev) for v in func.params[: len(imported.input_names)]]
        for f in batches
    ]

    stages: dict[str, list] = {}
    for c in caps:
        key = stage_of(c.name) if (mode == "sequential" and c.is_param) else "all"
        stages.setdefault(key, []).append(c)
    if mode == "one-pass":
        stages = {"all": caps}
    cal = Calibration({}, 0, mode)
    # progress per forward pass: one per window and stage, minutes in all on a real model
    bar = tqdm(
        total=len(stages) * len(feeds),
        desc=f"calibration ({mode})",
        unit="window",
        disable=not logger.isEnabledFor(logging.INFO),
        leave=False,
    )
    for key, group in stages.items():
        wanted = sorted({c.index for c in group})
        sums = {i: 0 for i in wanted}
        tokens = 0
        for args in feeds:
            out = vm["main"](*args, *weights.values())
            cal.forwards += 1
            bar.update(1)
            for i in wanted:  # one window's product in float32 (BLAS), the running sum in float64
                x = out[i].numpy()
                sums[i] = sums[i] + (x.T @ x).astype(np.float64)
            tokens += int(out[wanted[0]].shape[0])
        cal.tokens = max(cal.tokens, tokens)
        for c in group:
            h = sums[c.index] / tokens
            cal.hessians[c.name] = h
            if fit is not None and c.is_param:
                stored = imported.params[c.name]
                bw = fit(c.name, np.ascontiguousarray(stored if c.transposed else stored.T, np.float32), h)
                if bw is not None:
                    cal.fitted[c.name] = bw
                    if mode == "sequential":
                        deq = bw.dequantize()
                        weights[c.name] = tvm.runtime.tensor(np.ascontiguousarray(deq if c.transposed else deq.T), dev)
        bar.set_postfix_str(key, refresh=False)
    bar.close()
    cal.seconds = time.time() - t0
    if memo is not None:
        _MEMO.clear()  # one model's Hessians at a time (hundreds of MB for a 135M model)
        _MEMO[memo] = cal
    logger.info(
        f"calibrated {len(caps)} matmuls ({mode}, {len(stages)} stage(s), {cal.forwards} forwards) on "
        f"{cal.tokens} tokens in {cal.seconds:.1f}s"
    )
    return cal


def collect_hessians(imported, batches: list[dict], target, skip=("lm_head",)) -> tuple[dict, int]:
    """One forward pass of the float model: ({weight name: H [K, K] float64}, token count)."""
    cal = calibrate(imported, batches, target, skip, mode="one-pass")
    return cal.hessians, cal.tokens
