"""A LUT kernel's identity: its symbol in the module, its tuning-database key and the arguments that
build it, parsed back from a symbol (sibling stacking reads the calls a rewrite emitted)."""

from __future__ import annotations

import re
from typing import NamedTuple


class LUTSpec(NamedTuple):
    """One LUT kernel: K inputs, N outputs, planes, inputs per scale group, per-group offsets,
    rows sharing a scale, one-byte e5m2 scales, tied plane scales. A tuple, so ``spec(*key)``."""

    k: int
    n: int
    bits: int
    group: int
    offset: bool
    rows: int = 1
    fp8: bool = False
    tied: bool = False

    def name(self, backend: str = "avx2") -> str:
        """The kernel's symbol: the float-table kernel stores expanded float scales, so its name has
        no storage flags."""
        base = f"k{self.k}_n{self.n}_q{self.bits}_g{self.group}" + ("_z" if self.offset else "")
        base += f"_r{self.rows}" if self.rows != 1 else ""
        if backend == "f32":
            return "shiftadd_lut_" + base
        return "shiftadd_lut8_" + base + ("_f8" if self.fp8 else "") + ("_t" if self.tied else "")

    def key(self) -> str:
        """The tuning database's key (tuning.database adds the thread pool's regime). The scale
        storage is part of it (float16 keys keep their old form): e5m2 bytes and tied scales run
        other loops, so each is timed as itself."""
        fmt = (" e5m2" if self.fp8 else "") + (" tied" if self.tied else "")
        return f"lut8 k{self.k} n{self.n} q{self.bits} g{self.group} z{int(bool(self.offset))} r{self.rows}{fmt}"

    @classmethod
    def parse(cls, symbol: str) -> LUTSpec | None:
        """The spec of an AVX2 kernel symbol (:meth:`name`), else None."""
        m = _AVX2_NAME.match(symbol)
        if m is None:
            return None
        k, n, q, g, z, r, f8, t = m.groups()
        return cls(int(k), int(n), int(q), int(g), bool(z), int(r or 1), bool(f8), bool(t))


_AVX2_NAME = re.compile(r"^shiftadd_lut8_k(\d+)_n(\d+)_q(\d)_g(\d+)(_z)?(?:_r(\d+))?(_f8)?(_t)?$")
