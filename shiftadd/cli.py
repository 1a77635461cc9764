"""``shiftadd compile|run|eval|tune|presets``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import parse_sets


def _threads(parser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="worker threads of TVM's runtime (default: every physical core, or $TVM_NUM_THREADS)",
    )


def _cmd_compile(a) -> int:
    from .compiler import compile as do_compile

    res = do_compile(
        a.model,
        a.output,
        a.quant,
        a.opt,
        target=a.target,
        tokenizer=a.tokenizer,
        db=a.db,
        calibration_data=a.calibration_data,
        cluster=a.cluster,
        **parse_sets(a.set),
    )
    if res.report is not None:
        print(res.report.summary())
        print(
            f"average stored bits per rewritten weight (scales and offsets included): {res.report.average_bits():.3f}"
        )
        if a.report:
            from pathlib import Path

            from .runtime.artifact import atomic_path

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
    if a.input or a.text:
        return _run_tensors(a)
    from .runtime import load

    sess = load(a.artifact, threads=a.threads)
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

    res = sess.generate(
        prompt,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seed=a.seed,
        use_cache=not a.no_cache,
        stream=None if a.quiet else stream,
    )
    print()
    n = len(res["new_ids"])
    rate = f", decode {res['decode_tokens_per_s']:.1f} tokens/s" if res["decode_tokens_per_s"] else ""
    cache = "KV cache" if sess.kv_cache and not a.no_cache else "no KV cache"
    print(
        f"[{n} tokens in {res['seconds']:.2f}s ({cache}): prompt {res['prefill_seconds'] * 1e3:.0f} ms{rate}; "
        f"new ids: {' '.join(map(str, res['new_ids']))}]",
        file=sys.stderr,
    )
    return 0


def _run_tensors(a) -> int:
    """Run ``main`` once on arrays (``--input NAME=FILE.npy``) or tokenized texts (``--text``): the
    encoder and vision case. Prints each output's shape and value range; ``--output`` saves them."""
    import time
    from pathlib import Path

    import numpy as np

    from .runtime import load
    from .runtime.artifact import atomic_path

    sess = load(a.artifact, threads=a.threads)
    if a.text:
        feed = sess.text_feed(a.text)
    else:
        feed = {}
        for item in a.input:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--input {item!r}: expected NAME=FILE.npy")
            try:
                feed[name] = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ValueError(f"--input {name}: cannot read {path} as a .npy array ({e})") from None
    t0 = time.time()
    outs = sess.run(None, feed)
    dt = time.time() - t0
    names = [o.name for o in sess.get_outputs()]
    for name, out in zip(names, outs):
        print(f"{name}: {out.dtype} {list(out.shape)}  min {out.min():.6g}  mean {out.mean():.6g}  max {out.max():.6g}")
    print(f"[main in {dt * 1e3:.1f} ms]", file=sys.stderr)
    if a.output:
        out_path = Path(a.output)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **dict(zip(names, outs)))
        print(f"outputs: {out_path}")
    return 0


def _run_native(a) -> int:
    """The same generation by the C++ runner (greedy; the tokenizer stays on the Python side)."""
    import json

    from .runtime.artifact import paths, read_manifest
    from .runtime.native import build_runner, run_runner
    from .runtime.threads import default_threads

    if a.temperature or a.top_k or a.top_p != 1.0 or a.no_cache:
        raise ValueError("--native decodes greedily with the cache: drop --temperature/--top-k/--top-p/--no-cache")
    tok = None
    if a.prompt is not None or read_manifest(a.artifact, verify=False).get("tokenizer"):
        from transformers import AutoTokenizer

        if not paths(a.artifact)["tokenizer"].is_dir():
            raise ValueError(f"{a.artifact}: has no tokenizer: pass --ids instead of --prompt")
        tok = AutoTokenizer.from_pretrained(str(paths(a.artifact)["tokenizer"]))
    ids = [int(t) for t in a.ids.replace(",", " ").split()] if a.ids is not None else tok(a.prompt)["input_ids"]
    out = run_runner(
        a.artifact,
        ids,
        a.max_new_tokens,
        threads=a.threads or default_threads(),
        binary=build_runner(),
    )
    print((a.prompt or "") + (tok.decode(out["ids"], skip_special_tokens=True) if tok else ""))
    print(
        f"[shiftadd-run: new ids: {' '.join(map(str, out['ids']))}; timing {json.dumps(out['timing'])}]",
        file=sys.stderr,
    )
    return 0


def _cmd_tune(a) -> int:
    from .tuning.jobs import tune

    job = {
        k: getattr(a, k) for k in ("db", "target", "budget", "rpc", "key", "parallel", "float_trials", "float_min_work")
    }
    r = tune(a.model, a.quant, a.opt, float_ops=not a.no_float, **job, **parse_sets(a.set))
    print(
        f"{r['complete']}/{r['kernels']} kernels tuned in {r['db']} ({r['phases_done']} phases measured now by "
        f"{r['measured_by']}, {r['phases_left']} left"
        f"{' (budget reached: rerun to resume)' if r['phases_left'] else ''})"
    )
    if "attention" in r:
        t = r["attention"]
        print(
            f"attention kernels: {t['done']} knobs searched now, {t['left']} left"
            f"{' (budget reached: rerun to resume)' if t['left'] else ''}"
        )
    if "float" in r:
        f = r["float"]
        print(
            f"{f['done'] + f['complete_before']}/{f['tasks']} float operators tuned by MetaSchedule in {f['folder']} "
            f"({f['done']} now, {f['left']} left{' (budget reached: rerun to resume)' if f['left'] else ''})"
        )
    return 0


def _cmd_eval(a) -> int:
    if a.images:
        from .eval.images import eval_images

        if not str(a.artifact).endswith(".so"):
            raise ValueError(f"--images measures a compiled .so against its ONNX file; got {a.artifact}")
        row = eval_images(a.artifact, reference=a.reference, split=a.split, threads=a.threads, out=a.out, label=a.label)
        print(
            f"{row['label']}: {row['images']} {row['split']} images vs ONNX Runtime fp32: correlation "
            f"{row['corr_mean']:.4f} (worst {row['corr_worst']:.4f}), cosine {row['cosine_mean']:.4f}, "
            f"top-region IoU {row['iou_mean']:.3f} (worst {row['iou_worst']:.3f})"
        )
        return 0
    manifest = Path(str(a.artifact)).with_suffix(".json")
    if str(a.artifact).endswith(".so") and manifest.exists():
        ins = json.loads(manifest.read_text()).get("inputs") or []
        if [len(i["shape"]) for i in ins] == [4]:
            got = f"{ins[0]['name']} {ins[0]['shape']}"
            raise ValueError(f"{a.artifact} takes images ({got}): evaluate it with --images")
    from .eval.perplexity import eval_perplexity

    row = eval_perplexity(
        a.artifact, text=a.text, windows=a.windows, window=a.window, out=a.out, label=a.label, tokenizer=a.tokenizer
    )
    bits = "" if row["avg_bits"] is None else f", {row['avg_bits']:.3f} bits/weight"
    print(f"{row['label']}: perplexity {row['ppl']:.3f} on {row['tokens']} held-out {row['text']} tokens{bits}")
    if a.agreement:
        from .eval.agreement import agreement_report

        if not str(a.artifact).endswith(".so"):
            raise ValueError("--agreement compares a compiled .so with its float model; got " + str(a.artifact))
        agreement_report(a.artifact, reference=a.reference, windows=a.windows, window=a.window, out=a.out)
    return 0


def _options(parser) -> None:
    """The preset, the level and single-field overrides, shared by compile and tune."""
    from .config import DEFAULT_OPT, DEFAULT_PRESET, FIELD_SECTION, OPT_LEVELS, QUANT_PRESETS

    parser.add_argument(
        "--quant",
        default=DEFAULT_PRESET,
        choices=tuple(QUANT_PRESETS),
        help=f"quantization preset (default {DEFAULT_PRESET}; `shiftadd presets` lists them)",
    )
    parser.add_argument(
        "--opt", default=DEFAULT_OPT, choices=tuple(OPT_LEVELS), help=f"optimization level (default {DEFAULT_OPT})"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set group=128 --set windows=0; fields: " + ", ".join(FIELD_SECTION),
    )


def _cmd_presets(a) -> int:
    from .config import describe

    print(describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line (the benchmarks resolve compile arguments with it, as the CLI does)."""
    p = argparse.ArgumentParser(prog="shiftadd", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="compile a model (HF id/folder, .gguf, 'smollm2', or .onnx) into a .so")
    c.add_argument("model")
    c.add_argument("-o", "--output", required=True, help="artifact path, NAME.so (NAME.params/.json go beside it)")
    _options(c)
    c.add_argument("--target", default="cpu", help="'cpu' or a TVM target JSON dict")
    c.add_argument(
        "--db",
        default=None,
        help="tuning database file or folder (default ~/.cache/shiftadd/tuning.json or $SHIFTADD_TUNING_DB)",
    )
    c.add_argument("--tokenizer", help="for an ONNX input: model id/path or 'smollm2' whose tokenizer to store")
    c.add_argument(
        "--calibration-data",
        metavar="FILE.npz",
        help="calibrate on these inputs (one array per model input, samples along axis 0: e.g. images) "
        "instead of wiki text",
    )
    c.add_argument(
        "--cluster",
        metavar="ray://HOST:PORT",
        help="run the error-feedback fits on this Ray cluster (needs shiftadd[cluster]; same artifact as a local run)",
    )
    c.add_argument("--report", help="write the per-layer table (Markdown) here")
    c.set_defaults(fn=_cmd_compile)

    r = sub.add_parser(
        "run",
        help="run a compiled artifact: generate text (--prompt/--ids; greedy unless --temperature > 0), "
        "or run main once on arrays (--input) or texts (--text)",
    )
    r.add_argument("artifact")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--ids", help="prompt as token ids, e.g. '1 2 3'")
    g.add_argument(
        "--input",
        action="append",
        metavar="NAME=FILE.npy",
        help="an input of main as a .npy array (repeat for each input): encoders, vision models, any ONNX file",
    )
    g.add_argument("--text", action="append", help="a text for an encoder, tokenized by the stored tokenizer (repeat)")
    r.add_argument("--output", help="with --input/--text: save the outputs here (.npz)")
    _threads(r)
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    r.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    r.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (1: all)")
    r.add_argument("--seed", type=int, default=None, help="seed of the sampler (same seed, same text)")
    r.add_argument("--no-cache", action="store_true", help="rerun the whole sequence per token (reference)")
    r.add_argument("--quiet", action="store_true", help="print only the summary")
    r.add_argument(
        "--native",
        action="store_true",
        help="generate with the C++ runner shiftadd-run (built with cmake on first use; greedy)",
    )
    r.set_defaults(fn=_cmd_run)

    e = sub.add_parser(
        "eval",
        help="perplexity on held-out text of a compiled .so, an ONNX file (ONNX Runtime) "
        "or a HF model (torch float32), or with --images a vision .so's fidelity to ONNX Runtime fp32; "
        "tables and plots under --out",
    )
    e.add_argument("artifact", metavar="MODEL_OR_SO")
    e.add_argument("--text", default="wiki", help="evaluation text: 'wiki' (held-out packaged Wikipedia summaries)")
    e.add_argument("--windows", type=int, default=16, help="non-overlapping windows (default 16)")
    e.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    e.add_argument("--label", help="row label in the results table (default: the file stem)")
    e.add_argument("--tokenizer", help="for an ONNX file: model id/path or 'smollm2' whose tokenizer to use")
    e.add_argument("--agreement", action="store_true", help="also top-1 agreement of the .so with its float model")
    e.add_argument(
        "--images",
        action="store_true",
        help="a vision model: fidelity to ONNX Runtime fp32 on the packaged photographs (correlation, cosine, "
        "top-region IoU) instead of perplexity",
    )
    e.add_argument("--split", default="eval", help="--images: eval (default), calib or all photographs")
    e.add_argument(
        "--reference",
        default=None,
        help="float model for --agreement, ONNX file for --images (default: the artifact's model)",
    )
    e.add_argument("--out", default="results", help="results folder: perplexity.md/.json/.png (default results/)")
    _threads(e)
    e.set_defaults(fn=_cmd_eval)

    t = sub.add_parser(
        "tune",
        help="tune the LUT kernels a model needs and, with MetaSchedule, its static float operators "
        "into the database (budget, resume, RPC)",
    )
    t.add_argument("model", metavar="MODEL_OR_ONNX")
    t.add_argument(
        "--db",
        default=None,
        help="database file or folder (default ~/.cache/shiftadd/tuning.json "
        "or $SHIFTADD_TUNING_DB); compile --db reads it",
    )
    t.add_argument("--target", default="cpu", help="'cpu' (this machine) or a TVM target JSON (the RPC devices' CPU)")
    t.add_argument("--budget", default=None, help="time limit, e.g. 20m, 90s, 1h (default: none)")
    t.add_argument("--rpc", default=None, metavar="HOST:PORT", help="measure on the servers of this TVM RPC tracker")
    t.add_argument("--key", default=None, help="the RPC key the servers registered with (with --rpc)")
    t.add_argument("--parallel", type=int, default=None, help="RPC servers to use at once (default: all free)")
    _options(t)
    t.add_argument("--no-float", action="store_true", help="tune our kernels only, not the float operators")
    t.add_argument("--float-trials", type=int, default=None, help="MetaSchedule trials per float operator (default 32)")
    t.add_argument(
        "--float-min-work",
        type=int,
        default=None,
        help="tune float operators with more loop iterations than this (default 16384; smaller "
        "ones run serially untuned)",
    )
    _threads(t)
    t.set_defaults(fn=_cmd_tune)

    pr = sub.add_parser("presets", help="list the quantization presets and optimization levels with every field")
    pr.set_defaults(fn=_cmd_presets)
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if getattr(a, "threads", None) is not None:  # this process's TVM thread pool, before it exists
        if a.threads < 1:
            p.error(f"--threads: expected a positive integer, got {a.threads}")
        os.environ["TVM_NUM_THREADS"] = str(a.threads)
    try:
        return a.fn(a)
    except KeyboardInterrupt:
        print(
            "interrupted" + (": every finished phase is in the database; rerun to resume" if a.cmd == "tune" else ""),
            file=sys.stderr,
        )
        return 130
    except (ValueError, TypeError, FileNotFoundError, OSError, RuntimeError, ConnectionError) as e:
        print(f"shiftadd {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
