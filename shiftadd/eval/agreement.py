"""Output agreement with the float model, and perplexity, on held-out wiki text."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def agreement(sess, ref_model, ids: np.ndarray, progress: bool = True) -> dict:
    """Top-1 next-token agreement of ``sess`` with the torch ``ref_model`` over windows ``ids`` [W, T],
    plus both perplexities (next-token NLL over the same positions)."""
    import torch
    from tqdm import tqdm

    agree = total = 0
    nll_ours = nll_ref = 0.0
    t_ours = 0.0
    it = tqdm(ids, desc="eval windows", disable=not progress, leave=False)
    for row in it:
        ts = time.perf_counter()
        ours = sess.logits(row[None])[0]
        t_ours += time.perf_counter() - ts
        with torch.no_grad():
            ref = ref_model(input_ids=torch.from_numpy(row[None])).logits[0].float().numpy()
        agree += int((ours[:-1].argmax(-1) == ref[:-1].argmax(-1)).sum())
        total += len(row) - 1
        tgt = row[1:]
        nll_ours -= _log_softmax(ours[:-1])[np.arange(len(tgt)), tgt].sum()
        nll_ref -= _log_softmax(ref[:-1])[np.arange(len(tgt)), tgt].sum()
    return {
        "top1_agreement": agree / total,
        "tokens": total,
        "ppl": float(np.exp(nll_ours / total)),
        "ppl_float": float(np.exp(nll_ref / total)),
        "seconds_ours": t_ours,
    }


def agreement_report(
    artifact: str, reference: str | None = None, windows: int = 8, window: int = 128, out: str | None = "results"
) -> dict:
    from ..calibration.text import token_windows, wiki_split
    from ..frontend import load_hf_model
    from ..runtime import load

    sess = load(artifact)
    ref_spec = reference or sess.manifest["model"]
    ref_model, tok, _ = load_hf_model(ref_spec)
    tok = sess.tokenizer or tok
    if tok is None:
        raise ValueError("no tokenizer in the artifact or the reference model: cannot tokenize the text")
    ids = token_windows(tok, wiki_split("eval"), window, windows)
    logger.info(f"evaluating {artifact} on {windows} held-out wiki windows of {window} tokens ...")
    r = agreement(sess, ref_model, ids)
    q = sess.manifest.get("quant") or {}
    label = (
        f"{q.get('bits', 32)}-bit, group {q.get('group', '-')}"
        if sess.manifest.get("rewrite")
        else "float (no rewrite)"
    )
    row = (
        f"| {sess.manifest['model']} | {label} | {r['tokens']} | {100 * r['top1_agreement']:.2f} % | "
        f"{r['ppl']:.3f} | {r['ppl_float']:.3f} |"
    )
    table = (
        "| model | weights | tokens | top-1 agreement with float | perplexity | float perplexity |\n"
        "|---|---|---:|---:|---:|---:|\n" + row
    )
    print(table)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        p = Path(out) / f"agreement_{Path(artifact).stem}.md"
        p.write_text(table + "\n")
        logger.info(f"wrote {p}")
    return r
