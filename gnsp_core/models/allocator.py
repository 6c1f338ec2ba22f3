"""Keep freed tensor memory in the process heap instead of handing it back to the OS.

glibc gives large freed blocks (activation buffers) back to the kernel at once, so every CPU
forward pays page faults to get them again: gnsp-mini's image tower took 1.7 s per 32 images
(as much CPU time in the kernel as in torch) and takes 0.6 s with the heap keeping them (2-core
CPU). The cost: a process's resident memory stays at its peak, which training and serving
processes reach again on the next batch anyway.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGE = 1 << 30
_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process (once); False where that is not glibc."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _done = bool(libc.mallopt(_M_TRIM_THRESHOLD, _LARGE)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, _LARGE))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    return _done
