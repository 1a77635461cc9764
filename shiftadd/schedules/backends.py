"""A LUT kernel's identity (:class:`LUTSpec`) and the kernel back-ends that build it.

A spec gives the kernel's symbol in the module, its tuning-database key and the arguments that
build it, and parses back from a symbol (sibling stacking reads the calls a rewrite emitted). A
back-end says which specs it reads on a target, packs a fitted weight for its kernel and builds
the PrimFunc the rewrite calls; the rewrite asks :func:`backend_for` and has no per-back-end branch.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from . import lut_avx2
from . import lut_avx2_pack as P
from .lut_kernel import DEFAULT_VEC, build_lut_kernel


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


class F32Backend:
    """Float tables in TIR (exact to float rounding): portable, reads every layout."""

    name = "f32"
    tunable = False

    def __init__(self, vec: int = DEFAULT_VEC):
        self.vec = vec

    def supports(self, spec: LUTSpec, target=None) -> bool:
        return True

    def pack(self, w, spec: LUTSpec):
        from ..quant.pack import pack_bcq

        return pack_bcq(w, self.vec)

    def primfunc(self, spec: LUTSpec, knobs=None):
        return build_lut_kernel(spec.k, spec.n, spec.bits, spec.group, self.vec, spec.offset, spec.rows)


class AVX2Backend:
    """The int8-table C++ micro-kernel (AVX2, AVX-512 paths at run time), knobs from the tuning database."""

    name = "avx2"
    tunable = True

    def supports(self, spec: LUTSpec, target=None) -> bool:
        return (target is None or lut_avx2.target_supported(target)) and lut_avx2.supports(spec.group, spec.rows)

    def pack(self, w, spec: LUTSpec):
        return P.pack_avx2(w, fp8=spec.fp8)

    def primfunc(self, spec: LUTSpec, knobs=None):
        dec, bat = knobs or (lut_avx2.DEFAULT_KNOBS, lut_avx2.DEFAULT_BATCH_KNOBS)
        return lut_avx2.make_lut_avx2(*spec[:6], dec, bat, spec.fp8, spec.tied)


BACKENDS = {"f32": F32Backend, "avx2": AVX2Backend}
KERNELS = tuple(BACKENDS)  # float-table TIR kernel (portable), the AVX2/AVX-512 micro-kernel


def backend_for(kernel: str, spec: LUTSpec, vec: int = DEFAULT_VEC):
    """The ``kernel`` back-end if it reads ``spec``, else the portable float tables."""
    b = BACKENDS[kernel]() if kernel != "f32" else F32Backend(vec)
    return b if b.supports(spec) else F32Backend(vec)


def target_supported(target) -> bool:
    return lut_avx2.target_supported(target)


def pick_kernel(kernel: str, target) -> str:
    """'auto' -> 'avx2' on a target with AVX2/FMA/F16C, else the portable float-table kernel."""
    if kernel == "auto":
        return "avx2" if target_supported(target) else "f32"
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: expected 'auto' or one of {', '.join(KERNELS)}")
    if kernel == "avx2" and not target_supported(target):
        raise ValueError(
            "kernel 'avx2' needs a target with AVX2, FMA and F16C "
            f"(target mcpu {target.attrs.get('mcpu', '?')!r} lacks them)"
        )
    return kernel
