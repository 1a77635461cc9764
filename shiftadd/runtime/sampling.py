"""Next-token choice (greedy, temperature, top-k, top-p) and incremental detokenization for streaming."""

from __future__ import annotations

import numpy as np


class Sampler:
    """``temperature`` 0: argmax. Otherwise a draw from softmax(logits / temperature) restricted to the
    ``top_k`` largest logits (0: no limit) and then to the smallest prefix of the sorted distribution
    whose mass reaches ``top_p`` (1: no limit), as transformers' and ONNX Runtime GenAI's samplers do.
    One seeded generator per call of ``generate``: the same seed gives the same tokens in any thread."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.rng = np.random.default_rng(seed)

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, their probabilities) that a draw chooses from, most likely first."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        order = np.argsort(-z, kind="stable")
        if self.top_k:
            order = order[: self.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if self.top_p < 1:  # smallest prefix with mass >= top_p (the float sum may fall short: keep all)
            keep = min(int(np.searchsorted(np.cumsum(p), self.top_p)) + 1, len(p))
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return order, p

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        order, p = self.candidates(logits)
        return int(order[self.rng.choice(len(order), p=p)])


class TextStream:
    """Turns token ids into text pieces as they arrive: decodes everything so far and emits the new
    suffix, holding back while the text ends in an incomplete character (byte-level BPE splits UTF-8
    characters over tokens, and SentencePiece's leading spaces depend on context)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        if self.tok is None:
            return f" {int(token)}"
        text = self.text()
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent :], len(text)
        return piece

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)
