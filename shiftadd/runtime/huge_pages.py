"""The weights in one buffer backed by transparent huge pages.

Why: a decode step streams every weight once (75 MB per token for SmolLM2). In 4 KiB pages that is
about 19 000 pages a step: a TLB miss at each, and the hardware prefetchers stop at every page
boundary. Linux backs anonymous memory with 2 MiB pages only where asked (``madvise`` is the usual
THP setting), and TVM's allocator does not ask. Copied into one 2 MiB-aligned region marked
``MADV_HUGEPAGE``, the same weights made a decode step 11-15 % faster in paired runs
(docs/BENCHMARKS.md). The copy is made once at load (SmolLM2's session: peak RSS 668 -> 758 MB,
after load 654 -> 678 MB). Elsewhere (no THP, other systems) the tensors are returned as they are.
"""

from __future__ import annotations

import logging
import mmap

import numpy as np

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 64  # TVM's own tensor alignment


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else "unavailable"


def huge_region(nbytes: int, huge: bool = True) -> tuple[mmap.mmap, np.ndarray]:
    """``(mapping, bytes)``: ``nbytes`` of anonymous memory, 2 MiB-aligned, marked ``MADV_HUGEPAGE``
    before its first touch when ``huge`` (and the system has it). The array holds the mapping alive.
    Raises OSError / ValueError when the mapping cannot be made."""
    length = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    region = mmap.mmap(-1, length + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(region, dtype=np.uint8)
    start = (-raw.ctypes.data) % HUGE_PAGE
    if huge and hasattr(mmap, "MADV_HUGEPAGE") and length:
        region.madvise(mmap.MADV_HUGEPAGE, start, length)  # before the first touch: faults take 2 MiB pages
    return region, raw[start : start + nbytes]


def in_huge_pages(tensors: dict) -> tuple[dict, object | None]:
    """``(name -> tensor, buffer)``: copies of ``tensors`` (TVM CPU tensors) laid out one after the
    other in a huge-page region (the returned buffer keeps it alive; the copies also hold it), or
    ``(tensors, None)`` where transparent huge pages cannot be asked for."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or _thp_mode() not in ("madvise", "always") or not tensors:
        return tensors, None
    import tvm

    sizes = {n: int(np.prod(t.shape, dtype=np.int64)) * np.dtype(str(t.dtype)).itemsize for n, t in tensors.items()}
    try:
        region, buf = huge_region(sum(-(-s // ALIGN) * ALIGN for s in sizes.values()))
    except (OSError, ValueError) as e:
        logger.info(f"weights stay in TVM's allocation (no huge-page region: {e})")
        return tensors, None
    out, pos = {}, 0
    try:
        for name, t in tensors.items():
            view = buf[pos : pos + sizes[name]].view(str(t.dtype)).reshape(tuple(int(d) for d in t.shape))
            view[...] = np.from_dlpack(t)
            out[name] = tvm.runtime.from_dlpack(view)
            pos += -(-sizes[name] // ALIGN) * ALIGN
    except (TypeError, ValueError, BufferError) as e:  # a dtype numpy does not have (bfloat16)
        logger.info(f"weights stay in TVM's allocation ({type(e).__name__}: {e})")
        return tensors, None
    return out, region
