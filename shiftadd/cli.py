"""``shiftadd compile|run|eval|tune|bench``."""

from __future__ import annotations

import argparse
import sys


def _cmd_compile(a) -> int:
    from .compiler import compile as do_compile

    res = do_compile(a.model, a.output, bits=a.bits, group=a.group, apot_terms=a.apot_terms, rounds=a.rounds,
                     skip=tuple(a.skip), target=a.target, rewrite=not a.no_rewrite,
                     offset=not a.no_offset, tokenizer=a.tokenizer, calib_windows=a.calib,
                     calib_len=a.calib_len)
    if res.report is not None:
        print(res.report.summary())
        if a.report:
            from pathlib import Path

            Path(a.report).write_text(res.report.table() + "\n")
            png = Path(a.report).with_suffix(".png")
            res.report.plot(png)
            print(f"per-layer report: {a.report} (plot: {png})")
    print(f"artifact: {res.so}")
    return 0


def _cmd_run(a) -> int:
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

    res = sess.generate(prompt, max_new_tokens=a.max_new_tokens, stream=None if a.quiet else stream)
    print()
    n = len(res["new_ids"])
    print(f"[{n} tokens in {res['seconds']:.2f}s, {n / max(res['seconds'], 1e-9):.2f} tokens/s; "
          f"new ids: {' '.join(map(str, res['new_ids']))}]", file=sys.stderr)
    return 0


def _cmd_eval(a) -> int:
    from .evaluate import agreement_report

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
    c.add_argument("--apot-terms", type=int, default=3, help="signed powers of two per scale (default 3)")
    c.add_argument("--rounds", type=int, default=6, help="alternating refinement rounds (default 6)")
    c.add_argument("--skip", action="append", default=None, help="regex of weight names to keep float (default: lm_head)")
    c.add_argument("--target", default="cpu", help="'cpu' or a TVM target JSON dict")
    c.add_argument("--no-rewrite", action="store_true", help="compile the float model unchanged")
    c.add_argument("--no-offset", action="store_true", help="symmetric BCQ without the per-group offset")
    c.add_argument("--calib", type=int, default=0, metavar="N",
                   help="fit with error feedback against N windows of the wiki calibration text (default 0: off)")
    c.add_argument("--calib-len", type=int, default=128, help="tokens per calibration window (default 128)")
    c.add_argument("--tokenizer", help="for an ONNX input: model id/path or 'smollm2' whose tokenizer to store")
    c.add_argument("--report", help="write the per-layer table (Markdown) here")
    c.set_defaults(fn=_cmd_compile)

    r = sub.add_parser("run", help="generate text greedily with a compiled artifact")
    r.add_argument("artifact")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--ids", help="prompt as token ids, e.g. '1 2 3'")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--quiet", action="store_true", help="print only the summary")
    r.set_defaults(fn=_cmd_run)

    e = sub.add_parser("eval", help="top-1 agreement with the float model and perplexity on held-out wiki text")
    e.add_argument("artifact")
    e.add_argument("--reference", default=None, help="float model to compare with (default: the artifact's model)")
    e.add_argument("--windows", type=int, default=8)
    e.add_argument("--window", type=int, default=128)
    e.add_argument("--out", default="results", help="folder for the Markdown table")
    e.set_defaults(fn=_cmd_eval)

    for name, issue in (("tune", "autotuning"), ("bench", "benchmarks: see bench/")):
        s = sub.add_parser(name, help=f"{issue} (not available yet)")
        s.set_defaults(fn=lambda a, n=name, i=issue: (print(f"shiftadd {n}: not implemented yet ({i})",
                                                            file=sys.stderr), 2)[1])
    a = p.parse_args(argv)
    if a.cmd == "compile" and a.skip is None:
        a.skip = ["lm_head"]
    try:
        return a.fn(a)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"shiftadd {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
