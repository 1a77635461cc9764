"""Perplexity on held-out text for a compiled artifact (.so), an ONNX file (ONNX Runtime: the float
reference and its MatMulNBits peers) or a Hugging Face model (torch, float32), with results people
compare accumulated under a results folder: ``perplexity.json`` (one row per evaluated model and
text setting), ``perplexity.md`` (the table), ``perplexity.png`` (perplexity vs average bits) and,
for artifacts, ``<name>-layers.png`` (bits and weight error per layer).

Windows are non-overlapping, taken from the held-out split of the text
(``calibration.text.wiki_split('eval')``, never used for calibration); every position after the
first of a window is scored, so all models are compared on exactly the same tokens.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from ..runtime.artifact import atomic_path

logger = logging.getLogger(__name__)

TEXTS = ("wiki",)


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    lse = np.log(np.exp(x).sum(-1))
    return float((lse - x[np.arange(len(targets)), targets]).sum())


class _Runner:
    """logits(ids [1, T]) -> [T, V] for one kind of model, plus what the table shows about it."""

    def __init__(self, spec: str):
        self.spec = spec
        self.avg_bits: float | None = None
        self.weight_bytes: int | None = None
        self.manifest = None
        p = str(spec)
        if p.endswith(".so"):
            from ..runtime import load

            sess = load(p)
            self.manifest = sess.manifest
            self.tokenizer = sess.tokenizer
            self.kind = "shiftadd"
            self.label = Path(p).stem
            m = sess.manifest
            self.avg_bits = m.get("avg_bits") if m.get("rewrite") else 32.0
            self.weight_bytes = sum(lay["bytes"] for lay in m.get("layers") or []) or None
            self._fn = lambda ids: sess.logits(ids)[0]
        elif p.endswith(".onnx"):
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            s = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
            self.kind, self.label, self.tokenizer = "onnxruntime", Path(p).stem, None
            self.avg_bits, self.weight_bytes = onnx_weight_bits(p)
            self._fn = lambda ids: s.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
        else:
            import torch

            from ..frontend import load_hf_model

            model, self.tokenizer, src = load_hf_model(p)
            self.kind, self.label, self.avg_bits = "torch", f"{p} (torch float32)", 32.0

            def fn(ids):
                with torch.no_grad():
                    return model(input_ids=torch.from_numpy(ids)).logits[0].float().numpy()

            self._fn = fn

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self._fn(ids)


def onnx_weight_bits(path: str) -> tuple[float, int]:
    """(average stored bits per weight, bytes) over an ONNX model's MatMul/Gemm/MatMulNBits weights
    other than lm_head (float MatMul weights count 32 bits)."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    init = {i.name: i for i in m.graph.initializer}

    def nbytes(name):
        t = init.get(name)
        if t is None:
            return 0
        n = int(np.prod(t.dims)) if t.dims else 1
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    bits = weights = 0
    for node in m.graph.node:
        if "lm_head" in node.name or any("lm_head" in i for i in node.input):
            continue
        if node.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            weights += a["K"] * a["N"]
            bits += 8 * sum(nbytes(i) for i in node.input[1:4] if i)
        elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in init:
            t = init[node.input[1]]
            if len(t.dims) == 2:
                weights += int(np.prod(t.dims))
                bits += 8 * nbytes(node.input[1])
    return (bits / weights if weights else float("nan")), bits // 8


def perplexity(runner, ids: np.ndarray, progress: bool = True) -> dict:
    from tqdm import tqdm

    nll, n, t = 0.0, 0, 0.0
    bar = tqdm(
        ids,
        desc=f"perplexity {runner.label}",
        unit="window",
        disable=not progress or not logger.isEnabledFor(logging.INFO),
        leave=False,
    )
    for row in bar:
        ts = time.perf_counter()
        lg = runner.logits(row[None])
        t += time.perf_counter() - ts
        nll += _nll(lg[:-1], row[1:])
        n += len(row) - 1
        bar.set_postfix_str(f"ppl {np.exp(nll / n):.3f}", refresh=False)
    return {"ppl": float(np.exp(nll / n)), "nll": nll / n, "tokens": n, "seconds": t}


def _tokenizer_for(runner, tokenizer):
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    if isinstance(tokenizer, str) or runner.tokenizer is None:
        from transformers import AutoTokenizer

        from ..frontend import resolve_model

        spec = tokenizer or (runner.manifest or {}).get("model")
        if not spec:
            raise ValueError(
                f"{runner.spec}: no tokenizer stored with it; pass --tokenizer (a model id/path or 'smollm2')"
            )
        src = resolve_model(spec)
        kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        return AutoTokenizer.from_pretrained(src.path, **kw)
    return runner.tokenizer


def eval_perplexity(
    spec: str,
    text: str = "wiki",
    windows: int = 16,
    window: int = 256,
    out: str | None = "results",
    label: str | None = None,
    tokenizer=None,
    avg_bits: float | None = None,
    weight_bytes: int | None = None,
) -> dict:
    """Perplexity of ``spec`` (.so, .onnx or HF model) on ``windows`` held-out windows of ``window``
    tokens; appends the row to ``out``/perplexity.json and rewrites the table and plots."""
    from ..calibration.text import token_windows, wiki_split

    if text not in TEXTS:
        raise ValueError(f"--text must be one of {TEXTS}, got '{text}'")
    if Path(spec).suffix in (".json", ".params"):
        raise ValueError(f"{spec}: pass the artifact's .so (its .json and .params are found beside it)")
    if str(spec).endswith((".so", ".onnx")) and not Path(spec).exists():
        raise FileNotFoundError(f"{spec}: no such file")
    runner = _Runner(spec)
    if avg_bits is not None:  # a format the file does not show (e.g. weights stored dequantized)
        runner.avg_bits, runner.weight_bytes = avg_bits, weight_bytes
    tok = _tokenizer_for(runner, tokenizer)
    ids = token_windows(tok, wiki_split("eval"), window, windows)
    logger.info(f"perplexity of {spec} on {windows} held-out {text} windows x {window} tokens ...")
    r = perplexity(runner, ids)
    row = {
        "label": label or runner.label,
        "model": str(spec),
        "kind": runner.kind,
        "text": text,
        "windows": windows,
        "window": window,
        "tokens": r["tokens"],
        "ppl": round(r["ppl"], 4),
        "avg_bits": None if runner.avg_bits is None else round(float(runner.avg_bits), 3),
        "weight_bytes": runner.weight_bytes,
        "seconds": round(r["seconds"], 1),
    }
    if runner.manifest and runner.manifest.get("quant"):
        q = runner.manifest["quant"]
        row["config"] = {
            "bits": q.get("bits"),
            "group": q.get("group"),
            "budget": (runner.manifest.get("allocation") or {}).get("budget"),
            "calibration": (runner.manifest.get("calibration") or {}).get("mode"),
        }
    logger.info(f"{row['label']}: perplexity {r['ppl']:.3f} over {r['tokens']} tokens ({r['seconds']:.1f}s)")
    if out:
        write_results(out, row, runner.manifest)
    return row


def write_results(out: str, row: dict, manifest: dict | None = None) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    js = d / "perplexity.json"
    rows = json.loads(js.read_text()) if js.exists() else []
    key = (row["label"], row["text"], row["windows"], row["window"])
    rows = [r for r in rows if (r["label"], r["text"], r["windows"], r["window"]) != key] + [row]
    with atomic_path(js) as tmp:
        Path(tmp).write_text(json.dumps(rows, indent=1) + "\n")
    with atomic_path(d / "perplexity.md") as tmp:
        Path(tmp).write_text(results_table(rows) + "\n")
    _plot_ppl(rows, d / "perplexity.png")
    if manifest and manifest.get("layers"):
        _plot_layers(manifest, d / f"{row['label']}-layers.png")
    logger.info(f"results: {d / 'perplexity.md'}, {d / 'perplexity.png'}")


def results_table(rows: list[dict]) -> str:
    lines = [
        "| model | text | windows x tokens | perplexity | avg bits / weight (incl. scales) | weight bytes |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["text"], r["window"], -(r["avg_bits"] or 0), r["ppl"])):
        bits = "" if r["avg_bits"] is None else f"{r['avg_bits']:.3f}"
        wb = "" if r.get("weight_bytes") is None else f"{r['weight_bytes'] / 1e6:.2f} MB"
        lines.append(
            f"| {r['label']} | {r['text']} | {r['windows']} x {r['window']} | {r['ppl']:.3f} | {bits} | {wb} |"
        )
    return "\n".join(lines)


def _plot_ppl(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for r in rows:
        if r["avg_bits"] is None:
            continue
        if r["avg_bits"] >= 16:
            ax.axhline(r["ppl"], ls="--", color="gray", lw=1)
            ax.text(2.0, r["ppl"], f" {r['label']}", va="bottom", fontsize=7, color="gray")
            continue
        ax.plot(r["avg_bits"], r["ppl"], "o", color="C0" if r["kind"] == "shiftadd" else "C3")
        ax.annotate(r["label"], (r["avg_bits"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    low = [r["avg_bits"] for r in rows if r["avg_bits"] is not None and r["avg_bits"] < 16]
    ax.set_xlim(1.5, max(low + [5.5]) + 0.5)
    ax.set_xlabel("average stored bits per weight (scales included)")
    ax.set_ylabel("perplexity (held-out wiki)")
    ax.set_title("perplexity vs bits (blue: shiftadd, red: ONNX Runtime)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _plot_layers(manifest, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = manifest["layers"]
    x = np.arange(len(layers))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, 0.06 * len(x) + 2), 5), sharex=True, layout="constrained")
    a1.bar(x, [lay["bits"] for lay in layers], width=0.9)
    a1.set_ylabel("bits")
    a1.set_title(f"{manifest['model']}: bits and relative weight error per rewritten matmul")
    a2.bar(x, [lay["rel_error"] for lay in layers], width=0.9, color="C1")
    a2.set_ylabel("‖W-Ŵ‖/‖W‖")
    a2.set_xlabel("weight matmul (model order)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
