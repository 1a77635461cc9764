"""Where the per-stack fit tasks run: in this process, or on the workers of a Ray cluster.

A calibrated compile's fits (quant/gptq_rows.py) are independent tasks: one stack of same-shape
matrices, their Hessians in, codes and scales out. :func:`using` makes an executor current for a
block of code (``compile(cluster=...)`` wraps its fits in one); :func:`current` is what the fits
ask. Ray is an existing engine (``pip install 'shiftadd[cluster]'``), not a scheduler of ours: each
task is one Ray task, at most ``2 x`` the cluster's CPUs in flight, results taken in submission
order, so the artifact is the one a local fit writes (each task runs with the driver's torch
thread count: the float reductions then add in the same order; a worker on another CPU model
could still round differently, which is why the test compares on one machine).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator

logger = logging.getLogger(__name__)


class LocalExecutor:
    """Every task in this process, one after the other."""

    name = "local"

    def map(self, fn: Callable, tasks: Iterable[tuple]) -> Iterator:
        for args in tasks:
            yield fn(*args)


class RayExecutor:
    """Tasks on the Ray cluster at ``address`` (``ray://HOST:PORT`` through Ray Client, ``HOST:PORT``
    or ``auto`` as a driver on the cluster): connects on creation, says clearly why it cannot."""

    name = "ray"

    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise ValueError(
                f"cluster {address!r}: Ray is not installed (pip install 'shiftadd[cluster]', "
                "the same version as the cluster's)"
            ) from None
        self.address = address
        self._ray = ray
        _check_reachable(address)
        if not ray.is_initialized():
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            except Exception as e:  # noqa: BLE001 - connection refused, version mismatch, bad address
                raise ValueError(f"cluster {address!r}: cannot connect to the Ray cluster: {e}") from None
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        logger.info(f"fits on the Ray cluster at {address}: {self.cpus} CPUs")

    def map(self, fn: Callable, tasks: Iterable[tuple]) -> Iterator:
        import torch

        ray = self._ray
        remote = ray.remote(num_cpus=1)(_in_worker)
        threads = torch.get_num_threads()
        window: deque = deque()
        for args in tasks:
            window.append(remote.remote(fn, threads, *args))
            if len(window) >= 2 * self.cpus:
                yield ray.get(window.popleft())
        while window:
            yield ray.get(window.popleft())


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to ``HOST:PORT`` (Ray's own connect retries for a minute before it gives up)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"cluster {address!r}: expected ray://HOST:PORT, HOST:PORT or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"cluster {address!r}: cannot connect to {host}:{port} ({e.strerror or e})") from None


def _in_worker(fn: Callable, threads: int, *args):
    """``fn(*args)`` with the driver's torch threads (Ray gives its workers one by default)."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("shiftadd_fit_executor", default=LocalExecutor())


def executor_for(cluster: str | None):
    """The executor for a ``--cluster`` value: None -> in this process; ``ray://...``, ``HOST:PORT``
    or ``auto`` -> that Ray cluster."""
    if cluster is None:
        return LocalExecutor()
    if not isinstance(cluster, str) or not cluster.strip():
        raise ValueError(f"cluster: expected ray://HOST:PORT, HOST:PORT or 'auto', got {cluster!r}")
    return RayExecutor(cluster.strip())


def current():
    """The executor the fits run their tasks on."""
    return _CURRENT.get()


@contextlib.contextmanager
def using(executor):
    """Run the fits inside this block on ``executor``."""
    token = _CURRENT.set(executor)
    try:
        yield executor
    finally:
        _CURRENT.reset(token)
