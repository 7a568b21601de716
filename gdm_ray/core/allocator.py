"""Keep freed tensor memory in the process instead of handing it back to the kernel.

On glibc, a buffer above the mmap threshold (128 KiB, adapting up to 32 MiB)
is mmapped on allocation and unmapped on free. A search step's activations
are such buffers, so every step faulted in and zeroed tens of MB again:
a 1-thread scan chunk took 0.2-1.1 million minor page faults per 60 steps,
ran 13-17% slower than with the memory kept (16% at 2 threads), and its time
varied by +-10% from process to process with the allocator's history (the
noise in bench/scale.md's Ray-vs-core figures). With mmap off and trimming
only above 1 GiB, freed buffers are reused from the heap: no faults once the
heap has grown, for up to about 7% more peak memory. bench/allocator.py
measures it (bench/results/allocator.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
_TRIM_BYTES = 1 << 30  # free memory above this at the heap's top still goes back

_applied = False


def keep_freed_memory(enable: bool = True) -> bool:
    """Make glibc's malloc keep freed memory for reuse (this process, from now
    on). True when the setting is in force; False where it does not apply
    (not glibc, or ``enable`` false: then nothing changes)."""
    global _applied
    if not enable:
        return False
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; setting either also stops glibc's dynamic threshold
    _applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES) == 1
    return _applied
