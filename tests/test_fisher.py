"""Loss sensitivity (empirical Fisher of layer outputs) and the loss-aware output error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shiftadd.calibration.fisher import output_fisher
from shiftadd.quant.allocate import output_error

from .conftest import VOCAB, _tiny


def _batches(seed=0, n=3, seq=9):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (1, seq)).astype(np.int64)} for _ in range(n)]


def _reference(model, batches, module_name):
    """dL/dy by adding a zero tensor to the module's output and reading its gradient."""
    mod = dict(model.named_modules())[module_name]
    total, tokens = None, 0
    for b in batches:
        ids = torch.from_numpy(b["input_ids"])
        box = {}

        def add_delta(_m, _i, out):
            box["d"] = torch.zeros_like(out, requires_grad=True)
            return out + box["d"]

        h = mod.register_forward_hook(add_delta)
        try:
            logits = model(input_ids=ids).logits
        finally:
            h.remove()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        (g,) = torch.autograd.grad(loss, box["d"])
        sq = g.double().pow(2).reshape(-1, g.shape[-1]).sum(0)
        total = sq if total is None else total + sq
        tokens += ids.numel()
    return (total / tokens).numpy()


@pytest.mark.parametrize(
    "family,module",
    [
        ("llama", "model.layers.1.mlp.down_proj"),
        ("llama", "model.layers.0.self_attn.k_proj"),
        ("gpt2", "transformer.h.0.attn.c_attn"),
    ],
)
def test_fisher_matches_autograd_reference(family, module):
    model = _tiny(family)
    batches = _batches()
    want = _reference(model, batches, module)
    requires = [p.requires_grad for p in model.parameters()]
    got = output_fisher(model, batches)
    assert got[f"{module}.weight"].shape == want.shape
    np.testing.assert_allclose(got[f"{module}.weight"], want, rtol=1e-5, atol=1e-12)
    assert (want > 0).all()
    assert [p.requires_grad for p in model.parameters()] == requires  # restored
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were accumulated


def test_fisher_selects_named_layers_and_rejects_bad_input():
    model = _tiny("llama")
    got = output_fisher(model, _batches(n=1), names=["model.layers.0.mlp.up_proj.weight"])
    assert list(got) == ["model.layers.0.mlp.up_proj.weight"] and got["model.layers.0.mlp.up_proj.weight"].shape == (
        100,
    )
    with pytest.raises(ValueError, match="no calibration batches"):
        output_fisher(model, [])
    with pytest.raises(ValueError, match="no linear layers named"):
        output_fisher(model, _batches(n=1), names=["nope.weight"])
    with pytest.raises(ValueError, match=r"input_ids of shape \[batch, >= 2\]"):
        output_fisher(model, [{"input_ids": np.zeros((1, 1), np.int64)}])


def test_loss_aware_output_error_weights_rows():
    rng = np.random.default_rng(1)
    w, w_hat = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    x = rng.standard_normal((7, 40))
    h = x @ x.T / 40
    f = rng.random(5)
    d = w - w_hat
    np.testing.assert_allclose(output_error(w, w_hat, h, f), float(f @ np.diag(d @ h @ d.T)), rtol=1e-10)
    np.testing.assert_allclose(output_error(w, w_hat, None, f), float(f @ (d * d).sum(1)), rtol=1e-10)
    np.testing.assert_allclose(output_error(w, w_hat, h), float(np.trace(d @ h @ d.T)), rtol=1e-10)
    with pytest.raises(ValueError, match=r"fisher weights: shape \[5\]"):
        output_error(w, w_hat, h, f[:4])
