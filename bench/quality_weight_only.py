"""Weight-only quantization quality on SmolLM2-135M: ours (BCQ + APoT scales and offset) against the
paper's symmetric BCQ and asymmetric round-to-nearest (the usual int-N peer), all measured in one run
on the same held-out wiki windows. Weights are replaced by their dequantized values in torch, so this
measures the fit, not the kernels (those are checked exact against ONNX Runtime in tests/).

    python bench/quality_weight_only.py [--windows 6] [--group 64]
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from shiftadd.calibration.text import token_windows, wiki_split
from shiftadd.frontend import load_hf_model
from shiftadd.quant import BCQConfig, quantize_matrix


def rtn(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Asymmetric round-to-nearest with a per-group scale and integer zero point."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    s = (hi - lo) / (2**bits - 1)
    s[s == 0] = 1
    z = np.round(-lo / s)
    return ((np.clip(np.round(g / s) + z, 0, 2**bits - 1) - z) * s).reshape(n, k).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--group", type=int, default=64)
    a = ap.parse_args()
    logging.getLogger("shiftadd").setLevel(logging.WARNING)
    model, tok, _ = load_hf_model("smollm2")
    ids = torch.from_numpy(token_windows(tok, wiki_split("eval"), a.window, a.windows))
    params = dict(model.named_parameters())
    orig = {n: p.detach().clone() for n, p in params.items() if p.ndim == 2 and ".layers." in n}

    def ppl() -> float:
        nll, count = 0.0, 0
        with torch.no_grad():
            for row in ids:
                logits = model(input_ids=row[None]).logits[0, :-1].double()
                nll += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
                count += len(row) - 1
        return float(np.exp(nll / count))

    rows = [("float32", "-", ppl(), 0.0)]
    methods = [
        ("asymmetric RTN (peer)", lambda w, b: rtn(w, b, a.group)),
        (
            "BCQ symmetric, greedy init, 6 rounds (paper)",
            lambda w, b: quantize_matrix(w, BCQConfig(bits=b, group=a.group, offset=False)).dequantize(),
        ),
        (
            "BCQ + offset, zero-aligned grid init, 6 rounds (ours)",
            lambda w, b: quantize_matrix(w, BCQConfig(bits=b, group=a.group)).dequantize(),
        ),
    ]
    for bits in (4, 3):
        for name, fn in methods:
            t0 = time.time()
            for n, w in orig.items():
                params[n].data.copy_(torch.from_numpy(fn(w.numpy(), bits)))
            rows.append((name, bits, ppl(), time.time() - t0))
            print(f"{name} {bits}-bit: ppl {rows[-1][2]:.2f}", flush=True)
    print(
        f"\nSmolLM2-135M, {a.windows} held-out wiki windows x {a.window} tokens, group {a.group}, "
        f"lm_head and embeddings float\n"
    )
    print("| weights | bits | perplexity | vs RTN at same bits | seconds |\n|---|---:|---:|---:|---:|")
    ref = {r[1]: r[2] for r in rows if r[0].startswith("asymmetric")}
    for name, bits, p, sec in rows:
        ratio = f"{p / ref[bits]:.2f}x" if bits in ref else ""
        print(f"| {name} | {bits} | {p:.2f} | {ratio} | {sec:.0f} |")


if __name__ == "__main__":
    main()
