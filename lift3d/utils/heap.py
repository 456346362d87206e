"""Keep freed CPU memory from staying resident: glibc's malloc and its mmap threshold.

glibc serves an allocation below its mmap threshold from a heap that it returns to the system only
from the top, and after the first large free it raises that threshold (up to 32 MiB). A training step
allocates and frees tensors of a few MiB whose sizes change from one ray chunk to the next (the
occupancy grid keeps a different number of samples in each), so the heap fragments and the freed
memory stays resident: 1-2 GiB at the 256 px milestone of the SDS recipes. A fixed threshold
sends those tensors to mmap, whose memory goes back to the system the moment a tensor is freed.
The price is page faults on every such allocation. At 4 MiB, one stable-zero123 step at 4 x 256 px
(32 samples per ray) peaked at 0.9-2.0 GiB less and took ~15 % longer; the README's CPU job is as fast
as without (benchmarks/RESULTS.md, issue 13, session 8). 1 MiB saved 0.2 GiB more and cost ~35 %.

``trainer.mmap_threshold_mib`` sets it for the whole process (0: leave glibc alone). A threshold the user set in the
environment (``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES``) wins; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Optional

log = logging.getLogger("lift3d")

M_MMAP_THRESHOLD = -3          # glibc's malloc.h
# glibc's own cap on the threshold (HEAP_MAX_SIZE / 2 on 64-bit): a larger value is refused.
MAX_THRESHOLD_MIB = 32


def _glibc() -> Optional[ctypes.CDLL]:
    """This process's C library when it is glibc (musl and macOS have no such threshold to set)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def user_set_threshold() -> bool:
    return "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")


def set_mmap_threshold(mib: float) -> bool:
    """Allocations of ``mib`` MiB and more go to mmap from now on. Returns whether it was set."""
    if not mib or user_set_threshold():
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(mib * 2**20)))
    if not ok:
        log.warning("glibc refused an mmap threshold of %s MiB; freed memory may stay resident", mib)
    return ok


def fragments_heap(mib: float) -> bool:
    """Whether freed mid-size tensors stay resident under this setting: glibc with its own dynamic threshold."""
    return not mib and not user_set_threshold() and _glibc() is not None
