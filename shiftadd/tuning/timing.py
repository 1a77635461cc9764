"""Timing on a shared, noisy machine: medians of many interleaved calls over cold weight copies.

Used by the kernel tuner and by bench/. Every candidate gets a list of equivalent callables (one
per copy of its weights, so that a round touches more memory than the caches hold); each round
calls every copy of every candidate once, candidates in a fresh random order, so drifts in machine
load hit all of them alike.
"""

from __future__ import annotations

import random
import time
from typing import Callable

import numpy as np


def copies_for(nbytes: int, cold_bytes: int, most: int = 64) -> int:
    """How many copies of ``nbytes`` of weights make a round read at least ``cold_bytes``."""
    return max(1, min(most, -(-int(cold_bytes) // max(int(nbytes), 1))))


def interleaved(
    cands: dict[str, list[Callable[[], object]]],
    rounds: int,
    warmup: int = 1,
    seed: int = 0,
    budget_s: float | None = None,
    min_samples: int = 5,
    deadline: float | None = None,
) -> dict[str, np.ndarray]:
    """Seconds per call for each candidate: ``rounds`` x len(copies) samples, interleaved. With
    ``budget_s``, a candidate that has spent that long and has ``min_samples`` sits out later rounds
    (a slow fallback kernel need not be sampled as often as a fast one). Past ``deadline``
    (a ``time.perf_counter()`` value) no further round starts; the first always runs."""
    rng = random.Random(seed)
    for fns in cands.values():
        for _ in range(warmup):
            for f in fns:
                f()
    times: dict[str, list[float]] = {name: [] for name in cands}
    names = list(cands)
    clock = time.perf_counter
    for r in range(rounds):
        if r and deadline is not None and clock() > deadline:
            break
        rng.shuffle(names)
        for name in names:
            if budget_s is not None and len(times[name]) >= min_samples and sum(times[name]) > budget_s:
                continue
            for f in cands[name]:
                t0 = clock()
                f()
                times[name].append(clock() - t0)
    return {name: np.asarray(t) for name, t in times.items()}


def median_ms(t: np.ndarray) -> float:
    return float(np.median(t) * 1e3)
