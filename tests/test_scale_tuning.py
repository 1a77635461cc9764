"""End-to-end scale tuning (shiftadd/calibration/scale_tuning.py): lowers the KL to the float model, keeps the
codes and the storage format, and what it reports is what the substituted weights compute."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import shiftadd
from shiftadd.calibration.scale_tuning import tune_scales
from shiftadd.quant.bcq import BCQConfig
from shiftadd.quant.gptq import fit_layer

from .conftest import VOCAB, _tiny, tiny_llama_folder


def _distinct_norms(model, seed=1):
    """Fresh models have all-ones norm gains; make them distinct (as trained ones are)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, m in model.named_modules():
            if type(m).__name__.endswith("Norm") and getattr(m, "weight", None) is not None:
                m.weight.mul_(1 + 0.2 * torch.rand(m.weight.shape, generator=g))
    return model


def _fits(model, bits=2, tied=False):
    """Weight-only 2-bit fits of every linear layer except lm_head, as [N, K] (GPT-2's Conv1D transposed)."""
    cfg = BCQConfig(bits=bits, group=8, rounds=2, tied=tied)
    out = {}
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if (
            isinstance(w, torch.nn.Parameter)
            and w.ndim == 2
            and not isinstance(m, torch.nn.Embedding)
            and "lm_head" not in n
        ):
            w = w.detach().numpy()
            out[f"{n}.weight"] = fit_layer(w.T if type(m).__name__ == "Conv1D" else w, cfg)
    return out, cfg


def _kl_reference(model, fitted, norms, windows):
    """KL(float || substituted) per token, computed on a deep copy with plain state-dict writes."""
    q = copy.deepcopy(model)
    sd = q.state_dict()
    conv = {f"{n}.weight" for n, m in q.named_modules() if type(m).__name__ == "Conv1D"}
    with torch.no_grad():
        for name, bw in fitted.items():
            w = torch.from_numpy(bw.dequantize())
            sd[name].copy_(w.T if name in conv else w)
        for name, g in norms.items():
            sd[name].copy_(torch.from_numpy(g))
        x = torch.from_numpy(windows).long()
        t = torch.log_softmax(model(input_ids=x).logits.double(), -1)
        s = torch.log_softmax(q(input_ids=x).logits.double(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.mark.parametrize("family, tied", [("llama", False), ("gpt2", False), ("llama", True)])
def test_tuning_lowers_the_kl_and_keeps_codes_and_format(family, tied):
    """Tied scales (α_b = α_0 2^-b) stay tied: one tuned scale per (row, group)."""
    model = _distinct_norms(_tiny(family))
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    fitted, cfg = _fits(model, tied=tied)
    windows = np.random.default_rng(0).integers(0, VOCAB, (8, 12))
    res = tune_scales(model, fitted, windows, cfg.rounder(), steps=40, lr=2e-2, batch=4)
    # what it reports is what the weights compute (independent substitution, float64 softmax)
    assert res.kl_before == pytest.approx(_kl_reference(model, fitted, {}, windows), rel=1e-3)
    assert res.kl_after == pytest.approx(_kl_reference(model, res.fitted, res.norms, windows), rel=1e-3)
    assert res.kl_after < 0.8 * res.kl_before
    rnd = cfg.rounder()
    for name, bw in res.fitted.items():
        assert np.array_equal(bw.signs, fitted[name].signs)  # codes fixed
        a = torch.from_numpy(bw.alpha)
        assert torch.equal(rnd(a).float(), a)  # stored values: APoT-exact
        assert bw.tied == tied and (
            not tied or np.array_equal(bw.alpha, bw.alpha[:1] * 2.0 ** -np.arange(2)[:, None, None])
        )
        assert torch.equal(rnd(torch.from_numpy(bw.offset)).float(), torch.from_numpy(bw.offset))
    assert any(not np.array_equal(res.fitted[n].alpha, fitted[n].alpha) for n in fitted)
    norm_names = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__.endswith("Norm")}
    assert set(res.norms) == norm_names
    for n, p in model.named_parameters():  # the source model is left as it was
        assert torch.equal(p, before_params[n]) and p.grad is None


def test_shared_norm_gains_are_not_tuned():
    """Equal gains may be one initializer in the exported graph: tuning one would change the others."""
    model = _tiny("llama")  # all-ones gains everywhere
    fitted, cfg = _fits(model)
    res = tune_scales(model, fitted, np.zeros((2, 5), np.int64), cfg.rounder(), steps=1)
    assert res.norms == {}


def test_bad_arguments_are_named():
    model = _tiny("llama")
    fitted, cfg = _fits(model)
    ok = np.zeros((2, 5), np.int64)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        tune_scales(model, fitted, ok, cfg.rounder(), steps=0)
    with pytest.raises(ValueError, match=r"integer token ids \[count >= 1, length >= 2\], got float32"):
        tune_scales(model, fitted, ok.astype(np.float32), cfg.rounder(), steps=1)
    with pytest.raises(ValueError, match="none of the fitted matmuls"):
        tune_scales(model, {"nope.weight": next(iter(fitted.values()))}, ok, cfg.rounder(), steps=1)


def test_compile_with_tuned_scales_runs_what_was_tuned(tmp_path, monkeypatch):
    """A Hugging Face folder compiled with --tune-scales: the .so's logits equal torch's with the
    tuned dequantized weights and norm gains substituted (float-table kernel: exact to rounding);
    the model is loaded once for the export and the tuning."""
    import tvm

    import shiftadd.frontend.load as load

    folder = tmp_path / "tiny-hf"
    model = tiny_llama_folder(folder, _distinct_norms)
    vocab = model.config.vocab_size
    loads = []
    monkeypatch.setattr(load, "load_hf_model", lambda spec, real=load.load_hf_model: loads.append(spec) or real(spec))
    res = shiftadd.compile(
        str(folder),
        tmp_path / "t.so",
        "q3",
        bits=2,
        group=36,
        windows=4,
        length=16,
        refits=1,
        kv_cache=False,
        kernel="f32",
        keep_dequantized=True,
        tune_scales=6,
    )
    assert loads == [str(folder)]
    st = res.manifest["scale_tuning"]
    assert st["steps"] == 6 and st["norm_gains"] == 5 and st["kl_after"] < st["kl_before"]
    params = tvm.runtime.load_param_dict(res.so.with_suffix(".params").read_bytes())
    ref = copy.deepcopy(model)
    sd = ref.state_dict()
    layers = {r.name: r for r in res.report.rewritten}
    with torch.no_grad():
        for name, deq in res.report.dequantized.items():
            sd[name].copy_(torch.from_numpy(deq if layers[name].transposed else deq.T))
        gains = [n for n in sd if n.endswith("norm.weight")]
        for n in gains:
            sd[n].copy_(torch.from_numpy(params[n].numpy()))
        assert all(not torch.equal(sd[n], model.state_dict()[n]) for n in gains)  # tuned, and stored
        ids = np.random.default_rng(3).integers(0, vocab, (1, 11))
        want = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = shiftadd.load(res.so).run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
