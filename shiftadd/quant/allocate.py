"""Mixed-bit allocation (method.md §4): which layers get 2, 3 or 4 bits under an average-bits budget.

Two allocators over the same per-layer measurements:

* :func:`allocate_budget` (ours): a multiple-choice knapsack solved exactly by dynamic programming;
  minimises the summed predicted error ``Σ_l e_l(b_l)`` subject to
  ``Σ_l n_l b_l <= budget · Σ_l n_l`` (``n_l`` = weights of layer l). The budget is never exceeded.
* :func:`allocate_ratio` (the paper's): sort layers by the sensitivity score and give the most
  sensitive ``frac_high`` of the weights the higher bit width (80/20 -> ≈2.2 bits average).

The predicted error of layer l at b bits (shiftadd/calibration/plan.py) is :func:`output_error` of its
calibrated fit at b bits, ``tr((W - Ŵ_b) H (W - Ŵ_b)ᵀ)`` (= mean over calibration tokens of
‖(W - Ŵ_b) x‖²), loss-aware when the loss's sensitivity to each output is known (rows weighted by
the empirical Fisher, shiftadd/calibration/fisher.py): plain output error spends bits where activations are
large, not where errors move the loss (docs/QUALITY.md). The paper's score is :func:`sensitivity`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .bcq import SUPPORTED_BITS
from .refit import row_errors

CHOICES = SUPPORTED_BITS  # the widths a per-layer allocation picks from
MAX_UNITS = 200_000  # DP resolution; coarser units round every layer's cost up (budget still exact)


@dataclass
class LayerCost:
    name: str
    params: int  # number of weights
    errors: dict = field(default_factory=dict)  # bits -> predicted error
    score: float = 0.0  # the paper's sensitivity score


def sensitivity(w: np.ndarray, h: np.ndarray, damp: float = 0.01) -> float:
    """The paper's score for ``w`` [N, K] with input Hessian ``h`` [K, K]: ``d_j = U_jj`` of
    ``U = chol_upper(H⁻¹)`` (dampened), ``Z = W ⊘ d`` column-wise, score ``‖Z‖_F · std(Z)²``."""
    H = torch.from_numpy(np.asarray(h, np.float64).copy())
    k = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    z = torch.from_numpy(np.asarray(w, np.float64)) / torch.diag(U)[None, :]
    return float(torch.linalg.norm(z) * torch.std(z) ** 2)


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray | None, fisher: np.ndarray | None = None) -> float:
    """``tr(ΔW H ΔWᵀ)`` for ΔW = w - w_hat ([N, K]); the squared Frobenius norm when ``h`` is None.
    ``fisher`` ([N], shiftadd/calibration/fisher.py) weights row i's output error ``(ΔW H ΔWᵀ)_ii`` by the loss
    sensitivity of output i: ``Σ_i F_i (ΔW H ΔWᵀ)_ii`` (twice the predicted loss increase)."""
    d = torch.from_numpy(np.asarray(w, np.float64) - np.asarray(w_hat, np.float64))
    if h is None:
        rows = (d * d).sum(1)
    else:
        rows = row_errors(d, torch.zeros_like(d), torch.from_numpy(np.asarray(h, np.float64)))
    if fisher is not None:
        f = np.asarray(fisher, np.float64)
        if f.shape != (d.shape[0],):
            raise ValueError(f"fisher weights: shape [{d.shape[0]}] (one per output row) expected, got {list(f.shape)}")
        rows = rows * torch.from_numpy(f)
    return float(rows.sum())


def average_bits(layers: list[LayerCost], bits: dict[str, int]) -> float:
    total = sum(c.params for c in layers)
    return sum(c.params * bits[c.name] for c in layers) / total


def check_budget(budget: float, choices) -> None:
    if not (isinstance(budget, (int, float)) and math.isfinite(budget)):
        raise ValueError(f"average-bits budget must be a number, got {budget!r}")
    if not min(choices) <= budget <= max(choices):
        raise ValueError(
            f"average-bits budget {budget} is outside [{min(choices)}, {max(choices)}] "
            f"(the bit widths available: {list(choices)})"
        )


def allocate_budget(layers: list[LayerCost], budget: float, choices=CHOICES) -> dict[str, int]:
    """Bits per layer minimising ``Σ errors[bits]`` with average bits (weighted by params) <= budget."""
    choices = sorted(choices)
    check_budget(budget, choices)
    if not layers:
        raise ValueError("bit allocation: no layers to allocate")
    for c in layers:
        missing = [b for b in choices if b not in c.errors]
        if missing:
            raise ValueError(f"bit allocation: layer '{c.name}' has no predicted error for {missing} bits")
    lo = choices[0]
    g = 0
    for c in layers:
        g = math.gcd(g, int(c.params))
    units = [int(c.params) // g for c in layers]
    total = sum(units)
    # extra bits above the lowest width, in weight units: Σ u_l (b_l - lo) <= (budget - lo) Σ u_l
    cap_exact = (budget - lo) * total
    scale = max(1, math.ceil(total * (choices[-1] - lo) / MAX_UNITS))
    cost_units = [-(-u // scale) for u in units]  # ceil: never under-count a layer's cost
    cap = int(math.floor(cap_exact / scale + 1e-9))
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    pick = np.zeros((len(layers), cap + 1), dtype=np.int8)
    for i, c in enumerate(layers):
        new = np.full(cap + 1, inf)
        for j, b in enumerate(choices):
            w = cost_units[i] * (b - lo)
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[: cap + 1 - w] + c.errors[b]
            better = cand < new
            new[better] = cand[better]
            pick[i][better] = j
        best = new
    end = int(np.argmin(best))
    out = {}
    for i in range(len(layers) - 1, -1, -1):
        b = choices[pick[i][end]]
        out[layers[i].name] = b
        end -= cost_units[i] * (b - lo)
    assert average_bits(layers, out) <= budget + 1e-9
    return out


def allocate_ratio(layers: list[LayerCost], frac_high: float = 0.2, low: int = 2, high: int = 3) -> dict[str, int]:
    """The paper's rule: the most sensitive ``frac_high`` of the weights (by score) get ``high`` bits."""
    if not 0 <= frac_high <= 1:
        raise ValueError(f"frac_high must be in [0, 1], got {frac_high}")
    total = sum(c.params for c in layers)
    out, acc = {}, 0
    for c in sorted(layers, key=lambda c: -c.score):
        if acc + c.params <= frac_high * total + 1e-9:
            out[c.name], acc = high, acc + c.params
        else:
            out[c.name] = low
    return out


def allocation_table(layers: list[LayerCost], allocations: dict[str, dict[str, int]]) -> str:
    """Markdown: per layer, params, score, predicted error per bits, and each allocation's choice."""
    bits = sorted({b for c in layers for b in c.errors})
    head = ["layer", "weights", "score"] + [f"err@{b}" for b in bits] + list(allocations)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in layers:
        row = [c.name, str(c.params), f"{c.score:.3g}"] + [f"{c.errors[b]:.3g}" for b in bits]
        row += [str(a[c.name]) for a in allocations.values()]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(
        "| **average bits** | | | "
        + " | " * (len(bits) - 1)
        + " | ".join(f"{average_bits(layers, a):.3f}" for a in allocations.values())
        + " |"
    )
    return "\n".join(lines)
