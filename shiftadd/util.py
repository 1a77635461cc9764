"""Small helpers shared by every stage: progress logging and atomic file writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

_T0 = time.time()
QUIET = False


def log(msg: str) -> None:
    """Progress line on stderr with the elapsed time, so stdout stays clean for results."""
    if not QUIET:
        print(f"[shiftadd {time.time() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    An exception or Ctrl-C leaves neither a partial file nor the temporary behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
