"""Tuning the AVX2 LUT kernel's knobs on this machine, and the database ``compile`` reads them from.

A small grid on the real machine (T-MAC's approach: no cost model), per kernel key (K, N, bits,
group, offset, rows per scale): the decode knobs are timed at M = 1 and the batch knobs at
M = ``BATCH_M``. Entries live in one JSON file under a context (TVM version, CPU name and features,
hash of the micro-kernel source and of this grid): entries from another context are never applied
(they are reported once and ignored), so a stale database can only cost speed, never correctness.
Writes are atomic (temp file + rename) after every kernel, so an interrupted tuning keeps what it
measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..util import atomic_path, log
from . import lut_avx2 as L
from .timing import copies_for, interleaved, median_ms

BATCH_M = 32
VERSION = 1


def default_path() -> Path:
    env = os.environ.get("SHIFTADD_TUNING_DB")
    return Path(env) if env else Path.home() / ".cache" / "shiftadd" / "tuning.json"


def context() -> dict:
    """What an entry is only valid for."""
    import tvm
    from tvm.target import codegen

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = str(codegen.llvm_get_system_cpu())
    feats = ",".join(f for f in L.FEATURES)
    src = hashlib.sha256(L.SOURCE.read_bytes() + repr(L.KNOB_SPACE).encode()).hexdigest()[:16]
    return {"version": VERSION, "tvm": tvm.__version__, "cpu": f"{model} ({cpu}; {feats})", "kernel": src,
            "threads": int(os.environ.get("TVM_NUM_THREADS", "0") or 0),
            # whether TVM's idle workers spin decides if waking the second thread pays for small kernels
            "spin": os.environ.get("TVM_THREAD_POOL_SPIN_COUNT", "default")}


def key_of(k: int, n: int, bits: int, group: int, offset: bool, rows: int) -> str:
    return f"lut8 k{k} n{n} q{bits} g{group} z{int(bool(offset))} r{rows}"


class TuningDB:
    """``{"context": {...}, "entries": {key: {"decode": knobs, "batch": knobs, "ms": {...}}}}``."""

    def __init__(self, path: Path, data: dict | None = None):
        self.path = Path(path)
        self.ctx = context()
        self.entries: dict = {}
        self.stale = 0
        if data:
            if data.get("context") == self.ctx:
                self.entries = dict(data.get("entries", {}))
            else:
                self.stale = len(data.get("entries", {}))
                diff = sorted(k for k in set(self.ctx) | set(data.get("context", {}))
                              if self.ctx.get(k) != data.get("context", {}).get(k))
                warnings.warn(f"tuning database {self.path}: {self.stale} entries were tuned for another "
                              f"context ({', '.join(diff)} differ); ignoring them", stacklevel=3)

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> "TuningDB":
        p = Path(path) if path else default_path()
        if p.is_dir() or (path and not p.suffix):
            p = p / "tuning.json"
        if not p.exists():
            return cls(p)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"tuning database {p}: not readable JSON ({e}); delete it or pass another --db") from None
        if not isinstance(data, dict) or not isinstance(data.get("entries", {}), dict):
            raise ValueError(f"tuning database {p}: expected an object with 'context' and 'entries'")
        return cls(p, data)

    def get(self, k, n, bits, group, offset, rows) -> tuple[L.Knobs, L.Knobs] | None:
        e = self.entries.get(key_of(k, n, bits, group, offset, rows))
        if e is None:
            return None
        return L.Knobs(**e["decode"]), L.Knobs(**e["batch"])

    def knobs(self, k, n, bits, group, offset, rows) -> tuple[L.Knobs, L.Knobs]:
        return self.get(k, n, bits, group, offset, rows) or (L.DEFAULT_KNOBS, L.DEFAULT_BATCH_KNOBS)

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = entry
        self.save()

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"context": self.ctx, "entries": self.entries}, indent=1, sort_keys=True))


def _candidates(m: int) -> list[L.Knobs]:
    if m == 1:  # activation-row tiling does nothing for one row
        return [kn for kn in L.KNOB_SPACE if kn.mt == 1]
    return [kn for kn in L.KNOB_SPACE if kn.rbk <= 4 and (kn.mt > 1 or kn.rbk == 4)]


def tune_kernel(k, n, bits, group, offset, rows, cold_mib: int = 64, rounds: int = 5, seed: int = 0) -> dict:
    """Time every knob candidate at M = 1 and M = BATCH_M on random weights of this shape; returns
    the database entry (best knobs and the median ms of every candidate)."""
    import tvm

    from ..targets import resolve_target

    L.load_in_process()
    rng = np.random.default_rng(seed)
    packed = L.random_packed(k, n, bits, group, offset, rows, rng=rng)
    nbytes = sum(a.nbytes for a in packed)
    copies = [[tvm.runtime.tensor(a) for a in packed] for _ in range(copies_for(nbytes, cold_mib * 2**20, 16))]
    target = resolve_target("cpu")
    entry = {"ms": {}}
    for m, field in ((1, "decode"), (BATCH_M, "batch")):
        x = tvm.runtime.tensor(rng.standard_normal((m, k), dtype=np.float32))
        y = tvm.runtime.empty((m, n), "float32")
        cands = {}
        for kn in _candidates(m):
            f = L.make_lut_avx2(k, n, bits, group, offset, rows, kn, kn)
            fn = tvm.compile(tvm.IRModule({"main": f}), target)["main"]
            cands[kn.tag()] = ([(lambda fn=fn, p=p: fn(x, *p, y)) for p in copies], kn)
        times = interleaved({t: c[0] for t, c in cands.items()}, rounds=rounds if m == 1 else max(2, rounds // 2))
        med = {t: median_ms(v) for t, v in times.items()}
        best = min(med, key=med.get)
        entry[field] = asdict(cands[best][1])
        entry["ms"][field] = med
    return entry


def tune_missing(db: TuningDB, keys: list[tuple], **kw) -> int:
    """Tune every kernel key not yet in ``db`` (saving after each); returns how many were tuned."""
    todo = [kk for kk in dict.fromkeys(keys) if db.get(*kk) is None]
    for i, kk in enumerate(todo, 1):
        entry = tune_kernel(*kk, **kw)
        db.put(key_of(*kk), entry)
        d, b = entry["decode"], entry["batch"]
        log(f"tuned {i}/{len(todo)} {key_of(*kk)}: decode {L.Knobs(**d).tag()} {entry['ms']['decode'][L.Knobs(**d).tag()]:.3f} ms, "
            f"batch {L.Knobs(**b).tag()} {entry['ms']['batch'][L.Knobs(**b).tag()]:.3f} ms")
    return len(todo)
