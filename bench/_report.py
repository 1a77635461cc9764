"""What every benchmark writes: NAME.md (the exact command, then the table), NAME.json and NAME.png, atomically."""

from __future__ import annotations

import json
import platform
import sys
from contextlib import contextmanager
from pathlib import Path

from shiftadd.runtime.artifact import atomic_path

# Python puts bench/ first on sys.path for these scripts. Left there, any third-party probe for a
# top-level module named like one of ours imports it instead: transformers looks for the `kernels`
# package and ran bench/kernels.py, whose thread-pool settings (TVM workers sleep between calls)
# then held for the whole e2e/tuning/quality benchmark. Our scripts import _report first; after
# that nothing needs bench/ on the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def write_report(out: str | Path, name: str, text: str, data) -> Path:
    out = Path(out)
    with atomic_path(out / f"{name}.md") as tmp:
        tmp.write_text(f"`{' '.join(['python', *sys.argv])}`\n\n" + text + "\n")
    with atomic_path(out / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    return out


@contextmanager
def figure(out: str | Path, name: str, figsize=(7, 3)):
    """Yield a matplotlib Axes; on exit save it as ``out/NAME.png`` (atomically) and close it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        fig.tight_layout()
        with atomic_path(Path(out) / f"{name}.png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def cpu_name() -> str:
    """The CPU's model name with the instruction sets our kernels and llama.cpp's dispatch on."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in info.splitlines())}
    name = fields.get("model name") or platform.processor()
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'})"
