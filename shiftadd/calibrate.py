"""Calibration: per weight matmul, the input Hessian ``H = (1/n) Σ x xᵀ`` (float64) over real text."""

from __future__ import annotations

import time

import numpy as np

from .util import log


def collect_hessians(imported, batches: list[dict], target, skip=("lm_head",)) -> tuple[dict, int]:
    """Run the float model, instrumented by ``capture_matmul_inputs``, on ``batches`` (feeds of the
    model's inputs); returns ({weight name: H [K, K] float64}, token count)."""
    import tvm
    from tvm import relax
    from tqdm import tqdm

    from . import util
    from .compiler import build
    from .relax_passes.capture_matmul_inputs import capture_matmul_inputs

    if not batches:
        raise ValueError("calibration: no calibration inputs (empty text or zero windows)")
    mod, names = capture_matmul_inputs(imported.mod, imported.params, skip)
    t0 = time.time()
    ex = build(mod, target)
    vm = relax.VirtualMachine(ex, tvm.cpu(0))
    dev = tvm.cpu(0)
    weights = [tvm.runtime.tensor(v, dev) for v in imported.params.values()]
    n_in = len(imported.input_names)
    sums: dict[str, np.ndarray] = {}
    tokens = 0
    for feed in tqdm(batches, desc="calibration", disable=util.QUIET, leave=False):
        args = []
        for name in imported.input_names[:n_in]:
            a = np.asarray(feed[name])
            if a.dtype != np.int64 and name in ("input_ids", "attention_mask"):
                raise TypeError(f"calibration input '{name}': expected int64 token ids, got {a.dtype}")
            args.append(tvm.runtime.tensor(np.ascontiguousarray(a), dev))
        out = vm["main"](*args, *weights)
        for i, name in enumerate(names):
            x = out[i + 1].numpy().astype(np.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
        tokens += int(out[1].shape[0])
    log(f"calibrated {len(names)} matmuls on {tokens} tokens in {time.time() - t0:.1f}s")
    return {k: v / tokens for k, v in sums.items()}, tokens
