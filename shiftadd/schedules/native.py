"""Building and linking the C++ micro-kernel: compiled once per source and flags into a cache
(temp file, then rename), loaded into this process for in-memory runs, linked into every exported
.so; and which of its paths this CPU and the environment switches let it take."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels") / "lut_avx2.cc"  # includes the kernels/*.h: kernel_sources()
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-ffp-contract=off", "-std=c++17"]


def kernel_sources() -> list[Path]:
    """The micro-kernel's files, sorted by name: SOURCE (the one translation unit the build compiles)
    and every header beside it that it includes (quoted includes: found beside it, no -I needed)."""
    return sorted([SOURCE, *SOURCE.parent.glob("*.h")], key=lambda p: p.name)


def _cache_dir() -> Path:
    """Where the compiled micro-kernel lives: keyed by all its sources (each name and content, so
    editing a header or moving code between files makes a new key) and CFLAGS."""
    base = Path(os.environ.get("SHIFTADD_CACHE", Path.home() / ".cache" / "shiftadd"))
    h = hashlib.sha256()
    for p in kernel_sources():
        data = p.read_bytes()
        h.update(f"{p.name}\0{len(data)}\0".encode() + data)
    h.update(" ".join(CFLAGS).encode())
    key = h.hexdigest()[:16]
    return base / "kernels" / key


def compile_once(out: Path, shared: bool, source: Path = SOURCE, compiler: list[str] | None = None) -> Path:
    """``source`` compiled to ``out`` (a shared library or an object file) unless it is there already:
    written to a temporary name, then renamed, so a crash never leaves half a file. ``compiler``: the
    command and flags (default $CXX with CFLAGS, for the micro-kernel)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + f".tmp{os.getpid()}")
    cmd = [
        *(compiler or [os.environ.get("CXX", "g++"), *CFLAGS]),
        "-shared" if shared else "-c",
        str(source),
        "-o",
        str(tmp),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


@lru_cache(maxsize=1)
def object_file() -> str:
    """The micro-kernel compiled to an object file, linked into every exported .so (export_library addons)."""
    return str(compile_once(_cache_dir() / "lut_avx2.o", shared=False))


@lru_cache(maxsize=1)
def load_in_process() -> str:
    """Load the micro-kernel into this process (RTLD_GLOBAL) so in-memory executables resolve it
    (an unresolved call_extern in TVM's JIT crashes the interpreter instead of raising)."""
    import tvm  # noqa: F401  (the kernel calls TVM's thread pool: libtvm_runtime must be loaded first)

    path = str(compile_once(_cache_dir() / "liblut_avx2.so", shared=True))
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return path


def _path_bits() -> int:
    return ctypes.CDLL(load_in_process()).shiftadd_paths()


def active_paths() -> frozenset[int]:
    """The paths the micro-kernel takes here when asked to (this CPU's features; ``SHIFTADD_NO_AVX512``
    set turns path 2 off, ``SHIFTADD_NO_INT8`` path 1): a call with another path computes path 0's
    result. The kernel reads the variables once per process and again at each call of this function."""
    bits = _path_bits()
    return frozenset(p for p, b in ((0, 1), (1, 2), (2, 4)) if bits & b)


def int8_isa() -> str | None:
    """Which registers the int8 path (path 1) runs on here: "avx512-vnni", "avx2", or None when
    ``SHIFTADD_NO_INT8`` turns it off (both compute the same integers, so the same result)."""
    bits = _path_bits()
    return None if not bits & 2 else "avx512-vnni" if bits & 8 else "avx2"


def export(ex, path: str, **kwargs) -> None:
    """``ex.export_library`` with the micro-kernel linked in."""
    ex.export_library(path, addons=[object_file()], **kwargs)
