"""Loading and running compiled artifacts with the TVM runtime."""

from .session import NodeArg, Session, load

__all__ = ["NodeArg", "Session", "load"]
