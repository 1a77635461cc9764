"""Compile time and peak memory against model size (issue 25): synthetic Llama configs with random
weights (≈ 135 M, 360 M and 1 B parameters; SmolLM2's tokenizer, so calibration reads real text),
weight-only and calibrated, plus the real SmolLM2; seconds and peak RSS per compile phase, plotted
against parameters. Each compile runs in a fresh process (its own peak), one at a time.

    python bench/compile_scale.py                                 # every size, both modes, SmolLM2
    python bench/compile_scale.py --sizes 135M 360M --modes calibrated
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _report  # noqa: F401  (first: keeps bench/ off sys.path)
from _report import figure, write_report

# name -> Llama shape (SmolLM2-135M's and -360M's own; the 1 B one TinyLlama-1.1B's with SmolLM2's vocabulary)
SIZES = {
    "135M": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),
    "360M": dict(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5
    ),
    "1B": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
}
MODES = {"weight-only": ["windows=0"], "calibrated": []}  # --set overrides
# peak RSS per float32 weight byte measured by this bench (docs/BENCHMARKS.md): a size that cannot
# fit is reported as not run instead of being killed by the kernel half-way
PEAK_PER_FLOAT_BYTE = {"weight-only": 7.5, "calibrated": 12.5}
CACHE = Path(os.environ.get("SHIFTADD_CACHE", Path.home() / ".cache" / "shiftadd")) / "scale"


def synthetic_model(size: str) -> tuple[Path, int]:
    """A randomly initialised Llama of ``size`` saved as a Hugging Face folder (cached), and its
    parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from shiftadd.frontend import resolve_model

    folder = CACHE / f"llama-{size}"
    meta = folder / "params.json"
    if meta.exists():
        return folder, json.loads(meta.read_text())["params"]
    src = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    cfg = _config(size, len(tok))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "params.json").write_text(json.dumps({"params": params}))
    tmp.rename(folder)
    return folder, params


def _config(size: str, vocab: int = 49152):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5, **SIZES[size]
    )


def param_count(size: str) -> int:
    """Parameters of a synthetic size without building it (meta tensors)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(_config(size)).parameters())


def child(model: str, out: str, args: list[str], result: str) -> None:
    """One compile in this process; its phases, total seconds and peak RSS to ``result`` (JSON)."""
    import logging

    import shiftadd
    from shiftadd.config import parse_sets  # the CLI's own --set parsing
    from shiftadd.phases import _peak_mb

    logging.basicConfig(level=logging.INFO)
    t0 = time.time()
    r = shiftadd.compile(model, out, **parse_sets(args))
    total = time.time() - t0
    data = {
        "seconds": round(total, 1),
        "phases": r.phases,
        "peak_rss_mb": round(max([_peak_mb()] + [p["peak_rss_mb"] for p in r.phases]), 1),
    }
    Path(result).write_text(json.dumps(data))


def run_one(model: str, out: Path, args: list[str]) -> dict:
    result = out.with_suffix(".result.json")
    cmd = [sys.executable, __file__, "--child", model, str(out), str(result), *args]
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    data = json.loads(result.read_text())
    data["wall"] = round(time.time() - t0, 1)
    return data


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        model, out, result, *args = sys.argv[2:]
        return child(model, out, args, result)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--no-smollm2", action="store_true", help="skip the real SmolLM2 row")
    ap.add_argument("--out", default="out/compile_scale")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    todo = [(s, m) for s in a.sizes for m in a.modes] + ([] if a.no_smollm2 else [("smollm2", "calibrated")])
    for i, (size, mode) in enumerate(todo):
        params = 134_515_008 if size == "smollm2" else param_count(size)
        need = PEAK_PER_FLOAT_BYTE[mode] * 4 * params / 2**30
        have = _available_gb()
        if need > have:
            print(f"[{i + 1}/{len(todo)}] {size} {mode}: skipped, needs ≈ {need:.0f} GB, {have:.0f} GB available")
            skipped.append(f"{size} {mode} (needs ≈ {need:.0f} GB at the measured peak, {have:.0f} GB available)")
            continue
        model = "smollm2" if size == "smollm2" else str(synthetic_model(size)[0])
        print(f"[{i + 1}/{len(todo)}] {size} {mode} ...", flush=True)
        r = run_one(model, out / f"{size}-{mode}.so", MODES[mode])
        r.update(model=size, mode=mode, params=params)
        rows.append(r)
        phases = ", ".join(f"{p['phase']} {p['seconds']:.0f}s" for p in r["phases"])
        print(f"    {r['seconds']:.0f} s, peak RSS {r['peak_rss_mb'] / 1024:.2f} GB ({phases})", flush=True)
    names = sorted({p["phase"] for r in rows for p in r["phases"]}, key=_phase_order)
    head = (
        "| model | mode | params | compile s | s per M params | peak RSS GB | x float32 bytes | "
        + " | ".join(names)
        + " |"
    )
    lines = [
        f"CPU: {_cpu()}, {os.cpu_count()} logical cores; each cell of a phase: seconds / peak RSS GB",
        "",
        head,
        "|" + "---|" * (7 + len(names)),
    ]
    for r in rows:
        by = {p["phase"]: p for p in r["phases"]}
        cells = [f"{by[n]['seconds']:.0f} / {by[n]['peak_rss_mb'] / 1024:.1f}" if n in by else "" for n in names]
        per_m = r["seconds"] / (r["params"] / 1e6)
        vs_float = r["peak_rss_mb"] * 2**20 / (4 * r["params"])
        lead = f"| {r['model']} | {r['mode']} | {r['params'] / 1e6:.0f}M | {r['seconds']:.0f} | {per_m:.2f} "
        lines.append(lead + f"| {r['peak_rss_mb'] / 1024:.2f} | {vs_float:.2f} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Not run (memory): " + "; ".join(skipped)]
    text = "\n".join(lines)
    print(text)
    write_report(out, "compile_scale", text, rows)
    with figure(out, "compile_scale", figsize=(9, 3.2)) as ax:
        for mode in a.modes:
            pts = sorted(
                (r["params"] / 1e6, r["seconds"], r["peak_rss_mb"] / 1024)
                for r in rows
                if r["mode"] == mode and r["model"] != "smollm2"
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{mode}: seconds")
                ax.plot([p[0] for p in pts], [p[2] * 60 for p in pts], "s--", label=f"{mode}: peak RSS (GB x 60)")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("compile seconds")
        ax.legend(fontsize=7)
        ax.set_title("compile time and peak memory against model size")


def _phase_order(name: str) -> int:
    order = [
        "load",
        "export",
        "import",
        "calibration",
        "fisher",
        "bit allocation",
        "fit",
        "scale tuning",
        "rewrite + lower",
        "build",
        "write",
    ]
    return order.index(name) if name in order else len(order)


def _available_gb() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
