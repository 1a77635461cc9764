"""Measuring kernel candidates on other machines through TVM's RPC tracker and servers.

The tracker (``python -m tvm.exec.rpc_tracker``) hands out sessions of the servers registered under
a key (``python -m tvm.exec.rpc_server --tracker HOST:PORT --key NAME``). Each candidate is compiled
here for the remote's target (``--target``, with the AVX2 micro-kernel linked in), uploaded, and timed
there by TVM's time evaluator with the caches flushed before every repeat (cold weights, as in
decoding). The candidates of one phase are spread over every free server of the key.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..schedules import lut_avx2 as L
from ..schedules import lut_avx2_pack as P
from ..schedules import native as N


def parse_hostport(spec: str) -> tuple[str, int]:
    host, sep, port = str(spec).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--rpc: expected HOST:PORT of a TVM RPC tracker (e.g. 127.0.0.1:9190), got {spec!r}")
    return host, int(port)


class RPCMeasurer:
    """``measure()`` like :class:`~shiftadd.tuning.search.LocalMeasurer`, on the tracker's servers."""

    def __init__(
        self,
        tracker: str,
        key: str,
        target=None,
        repeat: int = 20,
        cold_mib: int = 64,
        parallel: int | None = None,
        session_timeout: float = 0,
        connect_timeout: float = 30,
    ):
        from tvm import rpc

        from ..schedules.targets import resolve_target

        if not key:
            raise ValueError("--key: the RPC key the servers registered with is required with --rpc")
        host, port = parse_hostport(tracker)
        self.target = resolve_target(target or "cpu") if target is None or isinstance(target, str) else target
        self.repeat, self.cold = repeat, cold_mib * 2**20
        self.name = f"rpc:{key}@{host}:{port}"
        try:  # a quick probe first: TVM's connect_tracker retries a refused connection for 60 s
            socket.create_connection((host, port), timeout=min(connect_timeout, 5)).close()
            self.tracker = rpc.connect_tracker(host, port)
        except Exception as e:  # noqa: BLE001 - socket errors come wrapped in several types
            raise ConnectionError(
                f"--rpc {host}:{port}: no TVM RPC tracker answers ({str(e).splitlines()[0]})"
            ) from None
        free = self._free(key, connect_timeout)
        n = min(parallel or free, free)
        self.sessions = [self.tracker.request(key, priority=1, session_timeout=session_timeout) for _ in range(n)]
        self.workdir = tempfile.mkdtemp(prefix="shiftadd-rpc-")
        self.loaded: dict = {}  # (session, library path) -> its remote module

    def close(self) -> None:
        """Hand the servers back to the tracker (a session ends when its last reference goes)."""
        import gc
        import shutil

        self.loaded.clear()
        self.sessions.clear()
        gc.collect()
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _free(self, key: str, timeout: float) -> int:
        """Free servers under ``key`` (waits up to ``timeout`` s for one: servers register after start)."""
        t0 = time.time()
        while True:
            info = self.tracker.summary().get("queue_info", {}).get(key, {})
            if info.get("free", 0) > 0:
                return int(info["free"])
            if time.time() - t0 > timeout:
                known = sorted(self.tracker.summary().get("queue_info", {}))
                raise ConnectionError(
                    f"--key {key!r}: no free RPC server registered with the tracker (keys there: {known or 'none'})"
                )
            time.sleep(0.5)

    @property
    def paths(self) -> frozenset[int]:
        """The kernel paths the remote target has the features of (Knobs.path)."""
        return L.paths_supported(self.target)

    def _evaluator(self, remote, dev, path: str):
        """``time_evaluator`` of ``main`` in the library at ``path`` on ``remote`` (median of
        ``repeat``, caches flushed); uploaded once per server: replacing a library it has loaded
        would crash it."""
        mod = self.loaded.get((id(remote), path))
        if mod is None:
            remote.upload(path)
            mod = self.loaded[id(remote), path] = remote.load_module(os.path.basename(path))
        return mod.time_evaluator("main", dev, number=1, repeat=self.repeat, cache_flush_bytes=self.cold)

    def _build(self, kk: tuple, kn: L.Knobs) -> str:
        import tvm

        # a name of this measurer's own: servers keep uploads by name, and replacing a loaded library's
        # file under a server that has it mapped would crash it
        from ..schedules.lut_spec import LUTSpec

        k, n, bits, group, offset, rows, fp8, tied = LUTSpec(*kk)
        path = os.path.join(
            self.workdir, f"lut-{os.path.basename(self.workdir)}-{'-'.join(map(str, kk))}-{kn.tag()}.so"
        )
        if not os.path.exists(path):
            f = L.make_lut_avx2(k, n, bits, group, offset, rows, kn, kn, fp8, tied)
            N.export(tvm.compile(tvm.IRModule({"main": f}), self.target), path)
        return path

    def measure(self, kk: tuple, m: int, cands: list[L.Knobs], deadline: float | None = None) -> dict[str, float]:
        libs = {kn.tag(): self._build(kk, kn) for kn in cands}  # compiled here, one at a time
        from ..schedules.lut_spec import LUTSpec

        rng = np.random.default_rng(0)
        k, n, bits, group, offset, rows, fp8, tied = LUTSpec(*kk)
        packed = P.random_packed(LUTSpec(*kk), rng)
        x = rng.standard_normal((m, kk[0]), dtype=np.float32)
        share = [list(libs.items())[i :: len(self.sessions)] for i in range(len(self.sessions))]

        def run(remote, jobs):
            import tvm

            dev = remote.cpu(0)
            args = [tvm.runtime.tensor(a, dev) for a in (x, *packed)] + [tvm.runtime.empty((m, kk[1]), "float32", dev)]
            out = {}
            for i, (tag, path) in enumerate(jobs):
                if i and deadline is not None and time.perf_counter() > deadline:
                    break
                ev = self._evaluator(remote, dev, path)
                out[tag] = float(np.median(ev(*args).results) * 1e3)
            return out

        with ThreadPoolExecutor(len(self.sessions)) as pool:
            parts = list(pool.map(run, self.sessions, share))
        return {t: v for p in parts for t, v in p.items()}

    def time_attention(self, spec, knobs, cases) -> dict:
        """``{knob: {"M,N": ms}}`` of an attention kernel (schedules/attention_cpu.py) on the
        servers: the timer of ``tuning.search.measure``; knobs split over the sessions, each timed
        by ``time_evaluator`` (median of ``repeat``, caches flushed) at every case."""
        import tvm

        from ..schedules import attention_cpu as A

        libs = {}
        for k in knobs:  # compiled here; a fresh name per measurer and knob (see _build)
            path = os.path.join(self.workdir, f"attn-{os.path.basename(self.workdir)}-{spec.name}-k{k}.so")
            if not os.path.exists(path):
                tvm.compile(tvm.IRModule({"main": A.kernel(spec, k)}), self.target).export_library(path)
            libs[k] = path
        rng = np.random.default_rng(0)
        data = {c: A.arrays(spec, *c, rng) for c in cases}
        share = [list(libs.items())[i :: len(self.sessions)] for i in range(len(self.sessions))]

        def run(remote, jobs):
            dev = remote.cpu(0)
            args = {c: [tvm.runtime.tensor(a, dev) for a in arrs] for c, arrs in data.items()}
            out = {}
            for k, path in jobs:
                ev = self._evaluator(remote, dev, path)
                out[k] = {f"{m},{n}": float(np.median(ev(*args[m, n]).results) * 1e3) for m, n in cases}
            return out

        with ThreadPoolExecutor(len(self.sessions)) as pool:
            parts = list(pool.map(run, self.sessions, share))
        return {k: v for p in parts for k, v in p.items()}
