"""``shiftadd compile|run|eval|tune|bench``."""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_compile(a) -> int:
    from .compiler import compile as do_compile

    res = do_compile(a.model, a.output, bits=a.bits, group=a.group, apot_terms=a.apot_terms, rounds=a.rounds,
                     skip=tuple(a.skip), target=a.target, rewrite=not a.no_rewrite,
                     offset=not a.no_offset, tokenizer=a.tokenizer, calib_windows=a.calib,
                     calib_len=a.calib_len, calib_mode=a.calib_mode, avg_bits=a.avg_bits, allocator=a.allocator,
                     layout=a.layout, block_rows=a.block_rows, kernel=a.kernel,
                     tune=a.tune, db=a.db, scale_format=a.scale_format,
                     kv_cache=not a.no_kv_cache, refits=a.refits, tune_scales=a.tune_scales,
                     loss_aware=not a.output_error_allocation, int8_batch=not a.no_int8_batch,
                     tied_scales=a.tied_scales)
    if res.report is not None:
        print(res.report.summary())
        print(f"average stored bits per rewritten weight (scales and offsets included): {res.report.average_bits():.3f}")
        if a.report:
            from pathlib import Path

            from .util import atomic_path

            md = Path(a.report)
            md.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(md) as tmp:
                Path(tmp).write_text(res.report.table() + "\n")
            res.report.plot(md.with_suffix(".png"))
            print(f"per-layer report: {md} (plot: {md.with_suffix('.png')})")
            if res.report.allocation is not None:
                alloc = md.with_name(md.stem + "-allocation.md")
                res.report.allocation.write(alloc)
                print(f"bit allocation: {alloc} (plot: {alloc.with_suffix('.png')})")
    print(f"artifact: {res.so}")
    return 0


def _cmd_run(a) -> int:
    if a.native:
        return _run_native(a)
    from .runtime import load

    sess = load(a.artifact)
    if a.ids is not None:
        prompt = [int(t) for t in a.ids.replace(",", " ").split()]
    else:
        prompt = a.prompt
    shown = []

    def stream(piece: str) -> None:  # echo the prompt once the first token exists (inputs were valid)
        if not shown:
            print(prompt if isinstance(prompt, str) else " ".join(map(str, prompt)), end="")
            shown.append(True)
        print(piece, end="", flush=True)

    res = sess.generate(prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                        top_p=a.top_p, seed=a.seed, use_cache=not a.no_cache, stream=None if a.quiet else stream)
    print()
    n = len(res["new_ids"])
    rate = f", decode {res['decode_tokens_per_s']:.1f} tokens/s" if res["decode_tokens_per_s"] else ""
    cache = "KV cache" if sess.kv_cache and not a.no_cache else "no KV cache"
    print(f"[{n} tokens in {res['seconds']:.2f}s ({cache}): prompt {res['prefill_seconds'] * 1e3:.0f} ms{rate}; "
          f"new ids: {' '.join(map(str, res['new_ids']))}]", file=sys.stderr)
    return 0


def _run_native(a) -> int:
    """The same generation by the C++ runner (greedy; the tokenizer stays on the Python side)."""
    import json

    from .artifact import paths, read_manifest
    from .runtime.native import build_runner, run_runner

    if a.temperature or a.top_k or a.top_p != 1.0 or a.no_cache:
        raise ValueError("--native decodes greedily with the cache: drop --temperature/--top-k/--top-p/--no-cache")
    tok = None
    if a.prompt is not None or read_manifest(a.artifact, verify=False).get("tokenizer"):
        from transformers import AutoTokenizer

        if not paths(a.artifact)["tokenizer"].is_dir():
            raise ValueError(f"{a.artifact}: has no tokenizer: pass --ids instead of --prompt")
        tok = AutoTokenizer.from_pretrained(str(paths(a.artifact)["tokenizer"]))
    ids = [int(t) for t in a.ids.replace(",", " ").split()] if a.ids is not None else tok(a.prompt)["input_ids"]
    out = run_runner(a.artifact, ids, a.max_new_tokens, threads=int(os.environ.get("TVM_NUM_THREADS", 0)) or None,
                     binary=build_runner())
    print((a.prompt or "") + (tok.decode(out["ids"], skip_special_tokens=True) if tok else ""))
    print(f"[shiftadd-run: new ids: {' '.join(map(str, out['ids']))}; timing {json.dumps(out['timing'])}]",
          file=sys.stderr)
    return 0


def _cmd_tune(a) -> int:
    from .tune import tune

    r = tune(a.model, db=a.db, target=a.target, budget=a.budget, rpc=a.rpc, key=a.key, bits=a.bits,
             group=a.group, offset=not a.no_offset, layout=a.layout, block_rows=a.block_rows, skip=tuple(a.skip),
             avg_bits=a.avg_bits, parallel=a.parallel, float_ops=not a.no_float, float_trials=a.float_trials,
             float_min_work=a.float_min_work, scale_format=a.scale_format, tied_scales=a.tied_scales)
    print(f"{r['complete']}/{r['kernels']} kernels tuned in {r['db']} ({r['phases_done']} phases measured now by "
          f"{r['measured_by']}, {r['phases_left']} left{' (budget reached: rerun to resume)' if r['phases_left'] else ''})")
    if "attention" in r:
        t = r["attention"]
        print(f"attention kernels: {t['done']} knobs searched now, {t['left']} left"
              f"{' (budget reached: rerun to resume)' if t['left'] else ''}")
    if "float" in r:
        f = r["float"]
        print(f"{f['done'] + f['complete_before']}/{f['tasks']} float operators tuned by MetaSchedule in {f['folder']} "
              f"({f['done']} now, {f['left']} left{' (budget reached: rerun to resume)' if f['left'] else ''})")
    return 0


def _cmd_eval(a) -> int:
    from .perplexity import eval_perplexity

    row = eval_perplexity(a.artifact, text=a.text, windows=a.windows, window=a.window, out=a.out, label=a.label,
                          tokenizer=a.tokenizer)
    bits = "" if row["avg_bits"] is None else f", {row['avg_bits']:.3f} bits/weight"
    print(f"{row['label']}: perplexity {row['ppl']:.3f} on {row['tokens']} held-out {row['text']} tokens{bits}")
    if a.agreement:
        from .evaluate import agreement_report

        if not str(a.artifact).endswith(".so"):
            raise ValueError("--agreement compares a compiled .so with its float model; got " + str(a.artifact))
        agreement_report(a.artifact, reference=a.reference, windows=a.windows, window=a.window, out=a.out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="shiftadd", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="compile a model (HF id/folder, .gguf, 'smollm2', or .onnx) into a .so")
    c.add_argument("model")
    c.add_argument("-o", "--output", required=True, help="artifact path, NAME.so (NAME.params/.json go beside it)")
    c.add_argument("--bits", type=int, default=3, help="BCQ bits per weight: 2, 3 or 4 (default 3)")
    c.add_argument("--group", type=int, default=64, help="inputs per scale group, multiple of 4, or -1 for whole rows (default 64)")
    c.add_argument("--layout", choices=("row-group", "block", "column"), default="row-group",
                   help="scale layout: per row and group (default), per 8 inputs x --block-rows rows, or per input column")
    c.add_argument("--block-rows", type=int, default=64, help="rows sharing a scale in the block layout (default 64)")
    c.add_argument("--kernel", choices=("auto", "avx2", "f32"), default="auto",
                   help="LUT kernel: the int8-table micro-kernel (auto on AVX2 CPUs; AVX-512 paths where the CPU has them) or portable float tables")
    c.add_argument("--no-kv-cache", action="store_true",
                   help="compile main only (no decode function: generation reruns the sequence per token)")
    c.add_argument("--scale-format", choices=("fp16", "e5m2"), default="fp16",
                   help="scale/offset storage: float16 APoT (default) or one-byte float8 e5m2 (APoT within 2 orders)")
    c.add_argument("--tied-scales", action="store_true",
                   help="one scale per row and group, plane b's being it times 2^-b (the uniform int grid as sign "
                        "planes): fewer bytes per weight than a scale per plane, the planes' sums added by shifts")
    c.add_argument("--no-int8-batch", action="store_true",
                   help="keep M > 1 (prefill, batches) on the LUT tables instead of the int8 path where the CPU "
                        "has AVX-512 VNNI: the decode kernel's arithmetic at every M (on weight-only SmolLM2 3-bit "
                        "perplexity 68.48 vs 69.46; exact float tables 68.31), slower prefill")
    c.add_argument("--tune", action="store_true",
                   help="tune the AVX2 kernels missing from the database on this machine first (saved for later compiles)")
    c.add_argument("--db", default=None,
                   help="tuning database file or folder (default ~/.cache/shiftadd/tuning.json or $SHIFTADD_TUNING_DB)")
    c.add_argument("--apot-terms", type=int, default=3, help="signed powers of two per scale (default 3)")
    c.add_argument("--rounds", type=int, default=6, help="alternating refinement rounds (default 6)")
    c.add_argument("--skip", action="append", default=None, help="regex of weight names to keep float (default: lm_head)")
    c.add_argument("--target", default="cpu", help="'cpu' or a TVM target JSON dict")
    c.add_argument("--no-rewrite", action="store_true", help="compile the float model unchanged")
    c.add_argument("--no-offset", action="store_true", help="symmetric BCQ without the per-group offset")
    c.add_argument("--calib", type=int, default=None, metavar="N",
                   help="fit with error feedback against N windows of the wiki calibration text "
                        "(default 128 when the model has a tokenizer; 0: weight-only)")
    c.add_argument("--calib-len", type=int, default=128, help="tokens per calibration window (default 128)")
    c.add_argument("--refits", type=int, default=3, metavar="N",
                   help="row-group layout with calibration: output-error refits of the scales alternated with "
                        "the error-feedback loop (default 3; 0: scales fitted to the weights only)")
    c.add_argument("--tune-scales", type=int, default=0, metavar="STEPS",
                   help="Hugging Face models: tune the scales and norm gains end to end for STEPS steps (4 "
                        "calibration windows each) against the float model's outputs (default 0: off)")
    c.add_argument("--calib-mode", choices=("one-pass", "sequential"), default="one-pass",
                   help="one-pass: Hessians of the float model (default); sequential: block by block on the "
                        "quantized model (GPTQ's protocol, ~18x slower on SmolLM2)")
    c.add_argument("--avg-bits", type=float, default=None, metavar="B",
                   help="mixed precision: allocate 2/3/4 bits per layer under this average (e.g. 2.5); overrides --bits")
    c.add_argument("--allocator", choices=("budget", "ratio"), default="budget",
                   help="budget: exact knapsack on predicted error (default); ratio: the paper's 80/20-style rule")
    c.add_argument("--output-error-allocation", action="store_true",
                   help="allocate on the plain output error, not weighted by the loss's sensitivity to each "
                        "output (the default for Hugging Face models: empirical Fisher on the calibration text)")
    c.add_argument("--tokenizer", help="for an ONNX input: model id/path or 'smollm2' whose tokenizer to store")
    c.add_argument("--report", help="write the per-layer table (Markdown) here")
    c.set_defaults(fn=_cmd_compile)

    r = sub.add_parser("run", help="generate text with a compiled artifact (greedy unless --temperature > 0)")
    r.add_argument("artifact")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--ids", help="prompt as token ids, e.g. '1 2 3'")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    r.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    r.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (1: all)")
    r.add_argument("--seed", type=int, default=None, help="seed of the sampler (same seed, same text)")
    r.add_argument("--no-cache", action="store_true", help="rerun the whole sequence per token (reference)")
    r.add_argument("--quiet", action="store_true", help="print only the summary")
    r.add_argument("--native", action="store_true",
                   help="generate with the C++ runner shiftadd-run (built with cmake on first use; greedy)")
    r.set_defaults(fn=_cmd_run)

    e = sub.add_parser("eval", help="perplexity on held-out text of a compiled .so, an ONNX file (ONNX Runtime) "
                                    "or a HF model (torch float32); tables and plots under --out")
    e.add_argument("artifact", metavar="MODEL_OR_SO")
    e.add_argument("--text", default="wiki", help="evaluation text: 'wiki' (held-out packaged Wikipedia summaries)")
    e.add_argument("--windows", type=int, default=16, help="non-overlapping windows (default 16)")
    e.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    e.add_argument("--label", help="row label in the results table (default: the file stem)")
    e.add_argument("--tokenizer", help="for an ONNX file: model id/path or 'smollm2' whose tokenizer to use")
    e.add_argument("--agreement", action="store_true", help="also top-1 agreement of the .so with its float model")
    e.add_argument("--reference", default=None, help="float model for --agreement (default: the artifact's model)")
    e.add_argument("--out", default="results", help="results folder: perplexity.md/.json/.png (default results/)")
    e.set_defaults(fn=_cmd_eval)

    t = sub.add_parser("tune", help="tune the LUT kernels a model needs and, with MetaSchedule, its static float operators "
                           "into the database (budget, resume, RPC)")
    t.add_argument("model", metavar="MODEL_OR_ONNX")
    t.add_argument("--db", default=None, help="database file or folder (default ~/.cache/shiftadd/tuning.json "
                                              "or $SHIFTADD_TUNING_DB); compile --db reads it")
    t.add_argument("--target", default="cpu", help="'cpu' (this machine) or a TVM target JSON (the RPC devices' CPU)")
    t.add_argument("--budget", default=None, help="time limit, e.g. 20m, 90s, 1h (default: none)")
    t.add_argument("--rpc", default=None, metavar="HOST:PORT", help="measure on the servers of this TVM RPC tracker")
    t.add_argument("--key", default=None, help="the RPC key the servers registered with (with --rpc)")
    t.add_argument("--parallel", type=int, default=None, help="RPC servers to use at once (default: all free)")
    t.add_argument("--bits", type=int, default=3)
    t.add_argument("--avg-bits", type=float, default=None, help="tune 2, 3 and 4 bits (mixed allocation)")
    t.add_argument("--group", type=int, default=64)
    t.add_argument("--layout", choices=("row-group", "block"), default="row-group")
    t.add_argument("--block-rows", type=int, default=64)
    t.add_argument("--no-offset", action="store_true")
    t.add_argument("--scale-format", choices=("fp16", "e5m2"), default="fp16", help="as the compile will use")
    t.add_argument("--tied-scales", action="store_true", help="as the compile will use")
    t.add_argument("--skip", action="append", default=None, help="regex of matmuls left float (default lm_head)")
    t.add_argument("--no-float", action="store_true", help="tune our kernels only, not the float operators")
    t.add_argument("--float-trials", type=int, default=None,
                   help="MetaSchedule trials per float operator (default 32)")
    t.add_argument("--float-min-work", type=int, default=None,
                   help="tune float operators with more loop iterations than this (default 16384; smaller "
                        "ones run serially untuned)")
    t.set_defaults(fn=_cmd_tune)

    for name, issue in (("bench", "benchmarks: see bench/"),):
        s = sub.add_parser(name, help=f"{issue} (not available yet)")
        s.set_defaults(fn=lambda a, n=name, i=issue: (print(f"shiftadd {n}: not implemented yet ({i})",
                                                            file=sys.stderr), 2)[1])
    a = p.parse_args(argv)
    if a.cmd in ("compile", "tune") and a.skip is None:
        a.skip = ["lm_head"]
    try:
        return a.fn(a)
    except KeyboardInterrupt:
        print("interrupted" + (": every finished phase is in the database; rerun to resume" if a.cmd == "tune" else ""),
              file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, OSError, RuntimeError, ConnectionError) as e:
        print(f"shiftadd {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
