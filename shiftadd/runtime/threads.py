"""TVM's thread count: every physical core unless told otherwise.

TVM's runtime sizes its thread pool once, from ``$TVM_NUM_THREADS`` or else half the logical CPUs it
sees (one of the two cores of a 2-core VM without SMT), and can later use fewer workers, never more.
So ``import shiftadd`` puts the physical core count in the environment when it is unset, before any
pool exists, and :func:`use_threads` (``Session(threads=)``, ``--threads``) narrows it afterwards.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def physical_cores() -> int:
    """Cores (not SMT siblings) among the CPUs this process may run on."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topo + "physical_package_id") as pkg, open(topo + "core_id") as core:
                cores.add((pkg.read().strip(), core.read().strip()))
        except OSError:  # no sysfs topology (containers, other systems): count logical CPUs
            return max(1, len(cpus))
    return max(1, len(cores))


def default_threads() -> int:
    """``$TVM_NUM_THREADS`` when set to a positive count, else the physical cores."""
    env = os.environ.get("TVM_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else physical_cores()


def prepare() -> None:
    """Before TVM's thread pool exists: size it to the physical cores unless the user chose a count."""
    if not os.environ.get("TVM_NUM_THREADS", "").isdigit():
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())


def use_threads(threads: int | None = None) -> int:
    """Run TVM's parallel loops on ``threads`` workers (None: :func:`default_threads`); returns the
    count in use. The pool is per process: the last call wins."""
    want = default_threads() if threads is None else threads
    if not isinstance(want, int) or isinstance(want, bool) or want < 1:
        raise ValueError(f"threads: expected a positive integer, got {threads!r}")
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, want)
    got = int(tvm.get_global_func("runtime.NumThreads")())
    if got < want:
        logger.warning(
            f"TVM's thread pool was created with {got} thread(s) before {want} were asked for: "
            f"running on {got} (set threads before the first run in this process)"
        )
    return got
