"""Tuning the AVX2 LUT kernel's knobs on this machine, and the database ``compile`` reads them from.

A small grid on the real machine (T-MAC's approach: no cost model), per kernel key (K, N, bits,
group, offset, rows per scale): the decode knobs are timed at M = 1 and the batch knobs at
M = ``BATCH_M``. Entries live in one JSON file under a context (TVM version, CPU name and features,
hash of the micro-kernel source and of this grid): entries from another context are never applied
(they are reported once and ignored), so a stale database can only cost speed, never correctness.
Writes are atomic (temp file + rename) after every kernel, so an interrupted tuning keeps what it
measured.

Databases tuned on the CPUs we measure on ship with the package (``tuning/shipped/*.json``): a key
the user's database lacks is looked up there when a shipped file's context is this machine's, and
a key in neither takes the knobs that won most often in that shipped file (per phase), so a compile
without any tuning run gets this CPU family's knobs, not one rule for every CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path

from ..runtime.artifact import atomic_path
from ..schedules import lut_avx2 as L
from ..schedules import native as N
from ..schedules.lut_spec import LUTSpec

logger = logging.getLogger(__name__)

BATCH_M = 32
PHASES = {"decode": 1, "batch": BATCH_M}  # phase -> activation rows it is timed at
VERSION = 4  # 4: keys carry the thread pool's spin regime (entries of 3 mixed them)
SHIPPED = Path(__file__).resolve().parent / "shipped"


def default_path() -> Path:
    env = os.environ.get("SHIFTADD_TUNING_DB")
    return Path(env) if env else Path.home() / ".cache" / "shiftadd" / "tuning.json"


def context(target=None) -> dict:
    """What an entry is only valid for: the target's CPU model (LLVM ``mcpu``) and the kernel's
    features on it, the TVM version, the micro-kernel source and knob grid, and threads. The thread
    pool's spin setting is in each key instead (:func:`spin_regime`): it changes which knobs win, never
    correctness, and in the context a process that saw another value ignored the whole database
    (docs/ENGINEERING.md).
    ``target``: a TVM Target or spec ('cpu' = this machine, the default; for RPC tuning, the remote's)."""
    import tvm
    from tvm.target import codegen

    from ..schedules.targets import resolve_target

    tgt = resolve_target(target or "cpu") if target is None or isinstance(target, str) else target
    mcpu = str(tgt.attrs.get("mcpu", "generic"))
    try:
        feats = ",".join(f for f in L.FEATURES + L.AVX512_FEATURES if codegen.target_has_features([f], tgt))
    except Exception:  # noqa: BLE001 - not an x86 target
        feats = ""
    src = hashlib.sha256(
        b"".join(f.read_bytes() for f in N.kernel_sources()) + repr(L.KNOB_SPACE).encode()
    ).hexdigest()[:16]
    # this process's kernel switches change which path runs (for an RPC target: the tuning job's own)
    feats += "".join(f"; {v}" for v in L.SWITCHES if L.switch_on(v))
    return {
        "version": VERSION,
        "tvm": tvm.__version__,
        "cpu": f"{mcpu}; {feats}",
        "kernel": src,
        "threads": int(os.environ.get("TVM_NUM_THREADS", "0") or 0),
    }


def spin_regime() -> str:
    """The TVM thread pool's waiting regime this process runs in, as part of every key: with
    ``TVM_THREAD_POOL_SPIN_COUNT=0`` (bench/kernels.py, fair to the other runtimes' pools) an idle
    worker sleeps and a two-thread call pays its wake-up, so one thread wins for small kernels;
    with the default spinning (the runtime, a decode step) two threads win. Knobs from one regime
    run slower in the other (docs/ENGINEERING.md), so each keeps its own."""
    v = os.environ.get("TVM_THREAD_POOL_SPIN_COUNT", "").strip()
    return "" if not v else f" spin{v}"


def key_of(*spec) -> str:
    """A kernel's database key: its spec's (schedules.backends.LUTSpec) and this process's spin regime."""
    return LUTSpec(*spec).key() + spin_regime()


def attention_key(spec) -> str:
    """Key of an attention kernel's knob (an AttentionKernel of schedules/attention_cpu.py; the
    file's source hash is in the key, so an entry for an older kernel is never applied)."""
    from ..schedules.attention_cpu import SOURCE_HASH

    mask = f" mask{spec.bias}" if spec.bias else ""
    return f"{spec.kind} h{spec.heads} d{spec.d} {spec.dtype}{mask} src{SOURCE_HASH}{spin_regime()}"


def _complete(entry) -> tuple[L.Knobs, L.Knobs] | None:
    if entry is None or any(ph not in entry for ph in PHASES):
        return None
    return L.Knobs(**entry["decode"]), L.Knobs(**entry["batch"])


def shipped_entries(ctx: dict) -> tuple[dict, str | None]:
    """The entries of the shipped database tuned in context ``ctx`` (and its file name), else {}."""
    for path in sorted(SHIPPED.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("context") == ctx:
            return dict(data.get("entries", {})), path.name
    return {}, None


class TuningDB:
    """``{"context": {...}, "entries": {key: {"decode": knobs, "batch": knobs, "ms": {...}}}}``."""

    def __init__(self, path: Path, data: dict | None = None, target=None):
        self.path = Path(path)
        self.ctx = context(target)
        # the int8 path runs on VNNI for this target (else on AVX2, where the untuned defaults differ)
        self.vnni = "avx512vnni" in self.ctx["cpu"] and "SHIFTADD_NO_AVX512" not in self.ctx["cpu"]
        self.entries: dict = {}
        self.stale = 0
        self.shipped, self.shipped_from = shipped_entries(self.ctx)
        if data:
            if data.get("context") == self.ctx:
                self.entries = dict(data.get("entries", {}))
            else:
                self.stale = len(data.get("entries", {}))
                diff = sorted(
                    k
                    for k in set(self.ctx) | set(data.get("context", {}))
                    if self.ctx.get(k) != data.get("context", {}).get(k)
                )
                warnings.warn(
                    f"tuning database {self.path}: {self.stale} entries were tuned for another "
                    f"context ({', '.join(diff)} differ); ignoring them",
                    stacklevel=3,
                )

    @classmethod
    def open(cls, path: str | os.PathLike | None = None, target=None) -> "TuningDB":
        """The database at ``path`` (a file, or a folder holding ``tuning.json``) for ``target``."""
        p = Path(path) if path else default_path()
        if p.is_dir() or (path and not p.suffix):
            p = p / "tuning.json"
        if p.exists() and not p.is_file():
            raise ValueError(f"tuning database {p}: not a file")
        if not p.exists():
            return cls(p, target=target)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"tuning database {p}: not readable JSON ({e}); delete it or pass another --db") from None
        if not isinstance(data, dict) or not isinstance(data.get("entries", {}), dict):
            raise ValueError(f"tuning database {p}: expected an object with 'context' and 'entries'")
        return cls(p, data, target=target)

    def get(self, k, n, bits, group, offset, rows, fp8=False, tied=False) -> tuple[L.Knobs, L.Knobs] | None:
        """(decode, batch) knobs of a fully tuned kernel, else None."""
        return _complete(self.entries.get(key_of(k, n, bits, group, offset, rows, fp8, tied)))

    def get_shipped(self, k, n, bits, group, offset, rows, fp8=False, tied=False) -> tuple[L.Knobs, L.Knobs] | None:
        """(decode, batch) knobs of this kernel in the database shipped for this machine's context."""
        return _complete(self.shipped.get(key_of(k, n, bits, group, offset, rows, fp8, tied)))

    def untuned_knobs(self, bits: int, tied: bool = False) -> tuple[L.Knobs, L.Knobs]:
        """Knobs of a kernel tuned nowhere: the shipped database's most frequent winners per phase
        for this machine's context, else the rule of lut_avx2.default_knobs."""
        rule = L.default_knobs(bits, self.vnni, tied)
        if not self.shipped:
            return rule
        picked = []
        for i, phase in enumerate(PHASES):
            wins = [L.Knobs(**e[phase]) for e in self.shipped.values() if phase in e]
            picked.append(max(set(wins), key=lambda kn, w=wins: (w.count(kn), kn == rule[i])) if wins else rule[i])
        return picked[0], picked[1]

    def has_phase(self, key: str, phase: str) -> bool:
        return phase in self.entries.get(key, {})

    def put_phase(self, key: str, phase: str, knobs: L.Knobs, ms: dict, measured_by: str) -> None:
        """Record one phase (decode: M = 1, batch: M = BATCH_M) of a kernel and save at once."""
        e = self.entries.setdefault(key, {"ms": {}})
        e[phase] = asdict(knobs)
        e["ms"][phase] = ms
        e.setdefault("measured_by", {})[phase] = measured_by
        self.save()

    def knobs(
        self, k, n, bits, group, offset, rows, fp8=False, tied=False, int8: bool = True
    ) -> tuple[L.Knobs, L.Knobs]:
        """(decode, batch) knobs: tuned in this database, else in the one shipped for this machine's
        context, else :meth:`untuned_knobs`. ``int8`` False keeps M > 1 on the LUT path (the decode
        kernel's arithmetic at every M): a batch pick on the int8 path is replaced by the fastest
        LUT candidate this entry timed, else LUT_BATCH_KNOBS."""
        key = (k, n, bits, group, offset, rows, fp8, tied)
        dec, bat = self.get(*key) or self.get_shipped(*key) or self.untuned_knobs(bits, tied)
        if not int8 and bat.path == 1:
            entry = self.entries.get(key_of(*key)) or self.shipped.get(key_of(*key), {})
            ms = entry.get("ms", {}).get("batch", {})
            lut = {kn.tag(): kn for kn in L.KNOB_SPACE if kn.path != 1 and kn.tag() in ms}
            bat = lut[min(lut, key=ms.get)] if lut else L.LUT_BATCH_KNOBS
        return dec, bat

    def attention_knob(self, spec) -> int | None:
        """The tuned knob of an attention kernel (AttentionKernel), or None (untuned: the default)."""
        knob = self.entries.get(attention_key(spec), {}).get("knob")
        return int(knob) if isinstance(knob, int) else None  # an entry without one: untuned

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = entry
        self.save()

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"context": self.ctx, "entries": self.entries}, indent=1, sort_keys=True))
