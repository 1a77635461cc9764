"""Bit allocation: the budget is never exceeded, the knapsack is optimal, the paper's score and rule."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shiftadd.quant.allocate import LayerCost, allocate_budget, allocate_ratio, average_bits, output_error, sensitivity


def _layers(rng, n):
    out = []
    for i in range(n):
        base = float(rng.random()) + 1e-3
        out.append(
            LayerCost(
                f"l{i}",
                int(rng.integers(1, 40)) * int(rng.choice([1, 3, 7, 64])),
                {b: base * float(rng.uniform(0.5, 1.5)) * 4.0**-b for b in (2, 3, 4)},
            )
        )
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), budget=st.floats(2.0, 4.0))
def test_budget_is_respected_and_the_choice_is_optimal(seed, n, budget):
    layers = _layers(np.random.default_rng(seed), n)
    bits = allocate_budget(layers, budget)
    total = sum(c.params for c in layers)
    assert sum(c.params * bits[c.name] for c in layers) <= budget * total + 1e-9
    best = min(
        sum(c.errors[b] for c, b in zip(layers, combo))
        for combo in itertools.product((2, 3, 4), repeat=n)
        if sum(c.params * b for c, b in zip(layers, combo)) <= budget * total + 1e-9
    )
    assert sum(c.errors[bits[c.name]] for c in layers) == pytest.approx(best, rel=1e-12)


def test_large_models_use_coarse_units_but_never_exceed_the_budget():
    rng = np.random.default_rng(3)
    layers = [LayerCost(f"l{i}", int(rng.integers(10_000, 3_000_000)), {2: 3.0, 3: 1.0, 4: 0.3}) for i in range(200)]
    for budget in (2.2, 2.5, 3.0, 3.7):
        avg = average_bits(layers, allocate_budget(layers, budget))
        assert avg <= budget and avg > budget - 0.01


def test_bad_budgets_are_refused():
    layers = _layers(np.random.default_rng(0), 3)
    for bad in (1.5, 4.5, float("nan"), "3"):
        with pytest.raises(ValueError, match="budget"):
            allocate_budget(layers, bad)
    with pytest.raises(ValueError, match="no layers"):
        allocate_budget([], 3.0)
    with pytest.raises(ValueError, match="no predicted error for \\[4\\] bits"):
        allocate_budget([LayerCost("x", 10, {2: 1.0, 3: 0.5})], 3.0)


def test_ratio_rule_gives_the_most_sensitive_fifth_three_bits():
    layers = [LayerCost(f"l{i}", 100, {}, score=float(i)) for i in range(10)]
    bits = allocate_ratio(layers, frac_high=0.2)
    assert [bits[f"l{i}"] for i in range(10)] == [2] * 8 + [3] * 2
    assert average_bits(layers, bits) == pytest.approx(2.2)


def test_sensitivity_and_output_error_match_numpy():
    rng = np.random.default_rng(0)
    n, k = 6, 9
    w = rng.standard_normal((n, k))
    x = rng.standard_normal((50, k)) @ rng.standard_normal((k, k))
    h = x.T @ x / 50
    hd = h + 0.01 * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(hd)).T  # upper Cholesky factor of H^-1
    z = w / np.diag(u)[None, :]
    assert sensitivity(w, h) == pytest.approx(np.linalg.norm(z) * np.std(z, ddof=1) ** 2, rel=1e-9)
    w_hat = w + 0.1 * rng.standard_normal((n, k))
    assert output_error(w, w_hat, h) == pytest.approx(((w - w_hat) @ x.T / np.sqrt(50)).__pow__(2).sum(), rel=1e-9)
    assert output_error(w, w_hat, None) == pytest.approx(((w - w_hat) ** 2).sum(), rel=1e-12)
