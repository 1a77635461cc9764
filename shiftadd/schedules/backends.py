"""The LUT kernel back-ends and which one a target gets."""

from __future__ import annotations

from .lut_avx2 import target_supported

KERNELS = ("f32", "avx2")  # float-table TIR kernel (portable), the AVX2/AVX-512 micro-kernel


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
