"""The LUT kernel back-ends and which one a kernel (lut_spec.LUTSpec) gets. A back-end says which
specs it reads on a target, packs a fitted weight for its kernel and builds the PrimFunc the rewrite
calls; the rewrite asks :func:`backend_for` and has no per-back-end branch."""

from __future__ import annotations

from . import lut_avx2
from . import lut_avx2_pack as P
from .lut_kernel import DEFAULT_VEC, build_lut_kernel
from .lut_spec import LUTSpec


class F32Backend:
    """Float tables in TIR (exact to float rounding): portable, reads every layout."""

    name = "f32"
    tunable = False
    stackable = False  # sibling calls stacked into one (relax_passes/fuse_sibling_luts.py)

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
    stackable = True

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
