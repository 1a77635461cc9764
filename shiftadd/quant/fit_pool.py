"""Independent layer fits, run side by side in worker processes.

Why: with every Hessian measured up front (one-pass calibration) the error-feedback fits of the
layers are independent, and each is a long chain of small torch operations (GPTQ's column loop) that
one core runs about as fast as two. So the cores fit different layers at once, each on one torch
thread, instead of all of them sharing each small operation.

Every fit runs on one torch thread whether it runs here or in a worker, so the result does not
depend on the worker count (tests check equality with the serial loop). Workers are spawned, not
forked: the compiling process has live OpenMP and TVM thread pools, which a fork does not carry over.
At most two jobs per worker are in flight, so the weights and Hessians queued for the workers stay a
small multiple of one layer's.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
from collections.abc import Callable, Iterable

import numpy as np


@contextlib.contextmanager
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _fit(job):
    from .gptq import fit_layer

    name, w, cfg, h = job
    return name, fit_layer(w, cfg, h)


def fit_layers(jobs: Iterable[tuple], workers: int = 1, done: Callable[[str], None] | None = None) -> dict:
    """``{name: fit_layer(w, cfg, h)}`` for ``jobs`` of (name, w [N, K], BCQConfig, H [K, K] or
    None), in ``workers`` processes (1: in this process). ``done(name)`` is called as each finishes
    (progress)."""
    jobs = sorted(jobs, key=lambda j: -np.size(j[1]))  # the largest first: the workers finish together
    if workers < 1:
        raise ValueError(f"workers: expected a positive count, got {workers}")
    out = {}
    if workers == 1 or len(jobs) < 2:
        with one_torch_thread():
            for job in jobs:
                name, bw = _fit(job)
                out[name] = bw
                if done:
                    done(name)
        return out
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker) as pool:
        pending, queue = set(), list(reversed(jobs))
        while queue or pending:
            while queue and len(pending) < 2 * workers:
                pending.add(pool.submit(_fit, queue.pop()))
            finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                name, bw = f.result()
                out[name] = bw
                if done:
                    done(name)
    return out
