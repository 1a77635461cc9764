"""Wall time and peak resident memory per compile phase (load, export, import, calibration, fit, ...).

``compile`` opens a :class:`Phases` record; code anywhere below it marks a phase with
``with phase("calibration"):`` (a no-op outside a compile). The peak is the process's VmHWM, reset at
each phase start where Linux allows it (``/proc/self/clear_refs``), so each row is that phase's own
peak; elsewhere it is the peak so far (``reset`` False in the record). Phases do not nest.
"""

from __future__ import annotations

import contextlib
import contextvars
import resource
import time

_current: contextvars.ContextVar[Phases | None] = contextvars.ContextVar("shiftadd_phases", default=None)


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phases:
    """The rows of one compile: name, seconds, peak RSS (MB)."""

    def __init__(self):
        self.rows: list[dict] = []
        self._token = None

    def __enter__(self):
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc):
        _current.reset(self._token)
        return False

    @contextlib.contextmanager
    def phase(self, name: str):
        reset = _reset_peak()
        t0 = time.time()
        try:
            yield
        finally:
            self.rows.append(
                {
                    "phase": name,
                    "seconds": round(time.time() - t0, 2),
                    "peak_rss_mb": round(_peak_mb(), 1),
                    "reset": reset,
                }
            )

    def peak_mb(self) -> float:
        return max((r["peak_rss_mb"] for r in self.rows), default=_peak_mb())

    def summary(self) -> str:
        return ", ".join(f"{r['phase']} {r['seconds']:.1f}s / {r['peak_rss_mb'] / 1024:.2f} GB" for r in self.rows)


def phase(name: str):
    """Mark a phase of the compile in progress (nothing outside a compile)."""
    rec = _current.get()
    return rec.phase(name) if rec is not None else contextlib.nullcontext()
