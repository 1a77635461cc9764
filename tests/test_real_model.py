"""The real model: SmolLM2-135M (packaged GGUF) with the default preset compiles, generates, and
agrees with the float model on held-out Wikipedia text. The measured figures
are printed (pytest -s shows them) and recorded in README.md."""

import numpy as np
import pytest

import shiftadd
from shiftadd.calibration.text import token_windows, wiki_split
from shiftadd.config import DEFAULT_PRESET
from shiftadd.eval.agreement import agreement
from shiftadd.schedules import native as N

WINDOWS, WINDOW = 4, 128


@pytest.fixture(scope="module")
def smollm2():
    from shiftadd.frontend import load_hf_model

    model, tok, _ = load_hf_model("smollm2")
    ids = token_windows(tok, wiki_split("eval"), WINDOW, WINDOWS)
    return model, tok, ids


def test_smollm2_compiles_generates_and_agrees(smollm2, tmp_path, monkeypatch):
    """The default preset (every matmul, lm_head included) calibrated on 4 x 128 wiki tokens without
    scale refits, to keep CI short (the default is 128 windows and 3 refits: docs/QUALITY.md; the
    other formats are checked on tiny models)."""
    quant, calib, floor = DEFAULT_PRESET, 4, 0.55
    model, tok, ids = smollm2
    res = shiftadd.compile("smollm2", tmp_path / f"smollm2-{quant}.so", quant, windows=calib, mode="one-pass", refits=0)
    assert len(res.report.rewritten) == 30 * 7 + 1 and not res.report.kept
    sess = shiftadd.load(res.so)
    gen = sess.generate("The capital of France is", max_new_tokens=8)
    assert len(gen["new_ids"]) >= 1 and isinstance(gen["text"], str)
    assert sess.kv_cache is not None

    def cache_vs_rerun():
        full = sess.run(["logits"], {"input_ids": seq, "attention_mask": np.ones_like(seq)})[0]
        _, *past = sess.run(None, {"input_ids": seq[:, :n0], "attention_mask": np.ones((1, n0), np.int64)})
        worst = 0.0
        for j in range(n0, seq.shape[1]):
            lg, *past = sess.run(
                None,
                {
                    "input_ids": seq[:, j : j + 1],
                    "attention_mask": np.ones((1, j + 1), np.int64),
                    **dict(zip(sess.kv_cache["inputs"], past)),
                },
                function="decode",
            )
            worst = max(worst, float(np.abs(lg[0, -1] - full[0, j]).max()))
        return worst, max(1.0, float(np.abs(full).max()))

    # the KV cache: same tokens as rerunning the sequence, and every decode step's logits equal main's.
    # Exactly so on one kernel path: M > 1 kept on the LUT tables like decode's M = 1 (the int8 path
    # for M > 1 rounds otherwise; checked loosely below)
    paths = N.active_paths()
    monkeypatch.setenv("SHIFTADD_NO_INT8", "1")
    N.active_paths()  # the micro-kernel reads the variable again
    try:
        gen = sess.generate("The capital of France is", max_new_tokens=8)
        assert gen["new_ids"] == sess.generate("The capital of France is", max_new_tokens=8, use_cache=False)["new_ids"]
        seq = np.asarray([gen["prompt_ids"] + gen["new_ids"]], np.int64)
        n0 = len(gen["prompt_ids"])
        worst, top = cache_vs_rerun()
    finally:
        monkeypatch.delenv("SHIFTADD_NO_INT8")
        N.active_paths()
    print(
        f"\nSmolLM2 {quant}: KV-cache decode vs full rerun, max |logit difference| {worst:.2e} (logits up to {top:.1f})"
    )
    assert worst <= 1e-4 * top
    if 1 in paths:  # here the rerun's M > 1 takes the int8 path: other roundings, never other logits
        worst, top = cache_vs_rerun()
        print(f"with the int8 path for the rerun: max |logit difference| {worst:.2e}")
        assert worst <= 0.15 * top
    r = agreement(sess, model, ids, progress=False)
    print(
        f"\nSmolLM2-135M {quant}, calibration windows {calib}: "
        f"top-1 agreement {100 * r['top1_agreement']:.2f} % over "
        f"{r['tokens']} tokens; perplexity {r['ppl']:.2f} (float {r['ppl_float']:.2f}); "
        f"continuation: {gen['text']!r}"
    )
    assert r["top1_agreement"] >= floor
    assert np.isfinite(r["ppl"])
