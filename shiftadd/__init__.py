"""shiftadd: compile pretrained models into multiplication-free (shift + LUT-add) TVM modules."""

__version__ = "0.1.0"


def compile(*args, **kwargs):  # noqa: A001 - the public verb, like tvm.compile
    """See :func:`shiftadd.compiler.compile`."""
    from .compiler import compile as _compile

    return _compile(*args, **kwargs)


def load(*args, **kwargs):
    """See :func:`shiftadd.runtime.load`."""
    from .runtime import load as _load

    return _load(*args, **kwargs)
