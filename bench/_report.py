"""What every benchmark writes: NAME.md (the exact command, then the table) and NAME.json, atomically."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from shiftadd.util import atomic_path


def write_report(out: str | Path, name: str, text: str, data) -> Path:
    out = Path(out)
    with atomic_path(out / f"{name}.md") as tmp:
        tmp.write_text(f"`{' '.join(['python', *sys.argv])}`\n\n" + text + "\n")
    with atomic_path(out / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    return out
