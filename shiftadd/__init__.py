"""shiftadd: compile pretrained models into multiplication-free (shift + LUT-add) TVM modules."""

import logging
import sys
import time

from ._version import __version__
from .runtime.threads import prepare as _prepare_threads

_prepare_threads()  # TVM's thread pool: every physical core unless $TVM_NUM_THREADS says otherwise

__all__ = ["__version__", "compile", "load"]


class _Elapsed(logging.Formatter):
    """Progress lines on stderr with the seconds since import, so stdout stays clean for results."""

    def __init__(self):
        super().__init__()
        self.t0 = time.time()

    def format(self, record):
        return f"[shiftadd {record.created - self.t0:7.1f}s] {record.getMessage()}"


_logger = logging.getLogger("shiftadd")
if not _logger.handlers:  # the library's own progress lines; silence with setLevel(logging.WARNING)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(_Elapsed())
    _logger.addHandler(_handler)
    if _logger.level == logging.NOTSET:
        _logger.setLevel(logging.INFO)
    _logger.propagate = False


def compile(*args, **kwargs):  # noqa: A001 - the public verb, like tvm.compile
    """See :func:`shiftadd.compiler.compile`."""
    from .compiler import compile as _compile

    return _compile(*args, **kwargs)


def load(*args, **kwargs):
    """See :func:`shiftadd.runtime.load`."""
    from .runtime import load as _load

    return _load(*args, **kwargs)
