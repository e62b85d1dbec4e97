"""Keep freed memory in the process on Linux, so a training step does not page-fault.

A training step frees and allocates the same large buffers every time (activations, the
gradients that ``zero_grad(set_to_none=True)`` drops, the chunked loss's pieces). glibc's
malloc serves each buffer above its mmap threshold with a fresh ``mmap`` and gives it
back with ``munmap`` when freed, so the next step touches new pages and the kernel
zero-fills every one of them: system time that counts against a CPU budget like any
other (BENCHMARKS.md, "Keeping freed memory": a third of a small model's CPU step). Raising the mmap
and trim thresholds keeps big buffers on malloc's heap for reuse; the process keeps its
peak memory, which a training or serving process needs again at its next step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_THRESHOLD = 1 << 30  # buffers up to 1 GiB come from the heap
_done = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process; True where that took
    effect (Linux with glibc), False elsewhere, where nothing changes."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    return _done
