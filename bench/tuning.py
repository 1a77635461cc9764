"""Tuning, whole model (issue 6): SmolLM2-135M at 3 bits, untuned (default knobs) vs tuned
(``shiftadd tune`` into a fresh database), per kernel class and end to end.

1. ``shiftadd.tuning.jobs.tune("smollm2", db=db, bits=3, budget=--budget)``: the tuning time spent.
2. Two compiles of the same model (weight-only fit: the weights are identical), one reading an empty
   database (every kernel on its default knobs), one reading the tuned database; and a third, the
   tuned one with ``attention=False`` (legalized attention on the generic schedules), as an ablation
   of our attention kernels.
3. Per kernel class: each decode step's VM calls are timed by a VM instrument (before/after every
   call: the times include a few microseconds of callback each, alike for both), summed per class,
   median over --profile-steps steps. End to end: un-instrumented decode steps after a --prompt-token
   prompt, models alternated over --rounds rounds, median ms per token.

    python bench/tuning.py [--budget 20m] [--rounds 5]

The tuned build also reads the knobs the job searched for our attention kernels over the cache
(scores, softmax, values: the cache length is symbolic) and the MetaSchedule records it made for the
static float operators (decode_one's float lm_head).

Writes out/bench/tuning.{md,json,png}.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
from _report import figure, write_report  # noqa: E402

logger = logging.getLogger("shiftadd.bench")

GENERIC = "tuned, generic attention"
CLASSES = (
    "LUT matmul (ours)",
    "attention over the cache (ours)",
    "float matmul (lm_head, static)",
    "softmax (other)",
    "norm",
    "other ops",
    "VM builtins",
)


def kernel_class(symbol: str) -> str:
    s = symbol.lower()
    if s.startswith("shiftadd_lut"):
        return CLASSES[0]
    if s.startswith(("shiftadd_scores", "shiftadd_values", "shiftadd_softmax")):
        return CLASSES[1]
    if s.startswith("vm.builtin") or "." in s:
        return CLASSES[6]
    if "matmul" in s:
        return CLASSES[2]
    if "softmax" in s:
        return CLASSES[3]
    if "mean" in s or "rsqrt" in s or "sqrt" in s or "norm" in s:
        return CLASSES[4]
    return CLASSES[5]


def attention_knobs(db) -> list[str]:
    """One line per attention kernel the job searched: the knob kept and each candidate's times."""
    from shiftadd.tuning.database import TuningDB

    out = []
    for key, e in TuningDB.open(db).entries.items():
        if key.split(" ")[0] in ("scores", "values", "softmax"):
            knobs = sorted(e["ms"], key=int)
            cases = sorted(e["ms"][knobs[0]], key=lambda c: tuple(map(int, c.split(","))))
            times = "; ".join(f"{b}: " + ", ".join(f"{e['ms'][b][c] * 1e3:.1f}" for c in cases) for b in knobs)
            cases = " ".join(f"({c})" for c in cases)
            out.append(
                f"Attention {key.split(' src')[0]}: knob {e['knob']} kept (us at M,N = {cases} per knob: {times})\n"
            )
    return out


def profile_steps(sess, prompt: list[int], steps: int) -> dict[str, float]:
    """Median ms per decode step in each kernel class: the session's own cached generation
    (``generate_ids``) on an instrumented VM, the prefill step left out."""
    from shiftadd.runtime.sampling import Sampler

    per_step = []
    acc: dict[str, float] = defaultdict(float)
    starts: list[float] = []

    def instrument(func, symbol, before, ret, *args):
        if before:
            starts.append(time.perf_counter())
        else:
            acc[kernel_class(str(symbol))] += time.perf_counter() - starts.pop()
        return 0

    sess._vm().set_instrument(instrument)
    try:
        for _ in sess.generate_ids(prompt, steps + 1, Sampler()):
            per_step.append(dict(acc))
            acc.clear()
    finally:
        sess._local.vm = None  # a fresh VM for the timed runs, without the instrument
    return {c: float(np.median([s.get(c, 0.0) for s in per_step[1:]]) * 1e3) for c in CLASSES}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="20m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--profile-steps", type=int, default=16)
    ap.add_argument("--work", default="out/tuning")
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--keep-db", action="store_true", help="reuse the database of an earlier run (resume)")
    a = ap.parse_args(argv)

    import shiftadd
    from shiftadd.runtime.sampling import Sampler
    from shiftadd.tuning.jobs import tune

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    db, empty = work / "tuning.json", work / "empty.json"
    if not a.keep_db:
        db.unlink(missing_ok=True)
        shutil.rmtree(work / "tuning-metaschedule", ignore_errors=True)
    empty.unlink(missing_ok=True)
    summary = tune("smollm2", db=db, bits=3, budget=a.budget)
    arts = {}
    for label, d, attention in (("untuned", empty, True), ("tuned", db, True), (GENERIC, db, False)):
        so = work / f"smollm2-q3-{label.replace(' ', '-').replace(',', '')}.so"
        res = shiftadd.compile("smollm2", so, bits=3, windows=0, db=d, attention=attention)
        arts[label] = (shiftadd.load(so), res.manifest["tuning"])
    prompt = np.random.default_rng(0).integers(100, 40000, a.prompt).tolist()
    ids = {label: s.generate(prompt, 8)["new_ids"] for label, (s, _) in arts.items()}
    same = ids["untuned"] == ids["tuned"]  # same kernels, other knobs: bit-identical by design
    same_generic = (
        ids[GENERIC] == ids["tuned"]
    )  # float rounding apart; the LUT kernel's int8 tables can flip a near tie
    classes = {label: profile_steps(s, prompt, a.profile_steps) for label, (s, _) in arts.items()}
    steps: dict[str, list[float]] = {k: [] for k in arts}
    for r in range(a.rounds):
        logger.info(f"round {r + 1}/{a.rounds}")
        for label in list(arts) if r % 2 == 0 else list(arts)[::-1]:
            sess = arts[label][0]
            steps[label] += [dt for _, dt in sess.generate_ids(prompt, a.new, Sampler())][1:]
    e2e = {k: float(np.median(v) * 1e3) for k, v in steps.items()}
    fl = summary["float"]
    rows = []
    tot = {k: sum(v.values()) for k, v in classes.items()}
    for c in CLASSES:
        u, t = classes["untuned"][c], classes["tuned"][c]
        rows.append(
            {
                "class": c,
                "untuned_ms": u,
                "tuned_ms": t,
                "untuned_share": u / tot["untuned"],
                "tuned_share": t / tot["tuned"],
                "speedup": u / t if t else None,
            }
        )
    lines = [
        f"SmolLM2-135M 3-bit (weight-only fit), decode after a {a.prompt}-token prompt, "
        f"{os.environ['TVM_NUM_THREADS']} threads. Tuning: {summary['complete']}/{summary['kernels']} LUT "
        f"kernels, {summary['phases_done']} phases in {summary['seconds']:.0f} s; MetaSchedule "
        f"{fl['done'] + fl['complete_before']}/{fl['tasks']} float operators in {fl['seconds']:.0f} s "
        f"(best {', '.join(f'{k} {v:.3f} ms' for k, v in fl['best'].items())}); whole job "
        f"{summary['seconds_total']:.0f} s (budget {a.budget}); "
        f"compile lookups untuned {arts['untuned'][1]}, tuned {arts['tuned'][1]}; same greedy tokens: {same}\n",
        *attention_knobs(db),
        "| kernel class | untuned ms/step | tuned ms/step | share untuned | share tuned | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else ""
        lines.append(
            f"| {r['class']} | {r['untuned_ms']:.2f} | {r['tuned_ms']:.2f} | {100 * r['untuned_share']:.1f} % | "
            f"{100 * r['tuned_share']:.1f} % | {sp} |"
        )
    lines.append(
        f"| total (instrumented) | {tot['untuned']:.2f} | {tot['tuned']:.2f} | | | "
        f"{tot['untuned'] / tot['tuned']:.2f}x |"
    )
    lines += [
        "",
        f"End to end (not instrumented, median of {a.rounds} rounds x {a.new - 1} steps): untuned "
        f"{e2e['untuned']:.2f} ms/token ({1e3 / e2e['untuned']:.1f} tokens/s), tuned {e2e['tuned']:.2f} "
        f"ms/token ({1e3 / e2e['tuned']:.1f} tokens/s): {e2e['untuned'] / e2e['tuned']:.2f}x",
        "",
        f"Ablation, {GENERIC} (compile attention=False: legalized attention with the generic "
        f"schedules, everything else as tuned): {e2e[GENERIC]:.2f} ms/token, i.e. our attention kernels "
        f"give {e2e[GENERIC] / e2e['tuned']:.2f}x end to end; instrumented step "
        f"{tot[GENERIC]:.2f} ms ({', '.join(f'{c} {v:.2f}' for c, v in classes[GENERIC].items() if v)}); "
        f"same greedy tokens as tuned: {same_generic}",
    ]
    text = "\n".join(lines)
    print(text)
    out = write_report(
        a.out,
        "tuning",
        text,
        {
            "tuning": summary,
            "classes": rows,
            "e2e_ms": e2e,
            "same_tokens": same,
            "same_tokens_generic_attention": same_generic,
        },
    )
    with figure(out, "tuning", (7, 2.8)) as ax:
        left = np.zeros(2)
        for r in rows:
            vals = np.array([r["untuned_ms"], r["tuned_ms"]])
            ax.barh(["untuned", "tuned"], vals, left=left, label=r["class"])
            left += vals
        ax.set_xlabel("ms per decode step, by kernel class (instrumented)")
        ax.legend(fontsize=7, loc="lower right")
    logger.info(f"wrote {out / 'tuning.md'}, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
