"""Large CPU tensors reuse freed memory instead of faulting fresh pages in at every step.

glibc's malloc serves a request above its mmap threshold (which it raises at most to 32 MiB) with
fresh pages from the kernel and returns them on free. A 224-pixel batch's activations are
hundreds of megabytes, so without this every forward pass on CPU has its buffers page-faulted in
and zeroed by the kernel again: a frozen ``tf_efficientnet_lite0`` forward over Flickr8k images
ran 4.5x slower that way on 2 busy cores (``benchmarks/bench_prefix_cache.py`` prints what it
costs a training step). Keeping freed memory in the heap (no mmap for large blocks, trimming only
above 1 GiB of free memory at the top) lets the next step reuse it; the price is that a
process's resident memory stays near its peak, which a training process reaches every step anyway.

Set for this process with ``mallopt`` and, through the environment variables glibc reads at
start-up, for every process it starts (data-loader workers, Ray workers, ``fit`` runs). A value
the user set already is kept; on another C library nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# glibc's mallopt parameters (malloc.h) and the environment variables that set them at start-up.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
SETTINGS = {
    "MALLOC_MMAP_MAX_": (M_MMAP_MAX, 0),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 1 << 30),
}
ENVIRONMENT = tuple(SETTINGS)


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (the settings are glibc's), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def keep_freed_memory() -> list[str]:
    """Applies the settings the user has not set; the names of those applied in this process."""
    libc = glibc()
    if libc is None:
        return []
    applied = []
    for name, (parameter, value) in SETTINGS.items():
        if name in os.environ:  # the user's choice, which glibc read when this process started
            continue
        os.environ[name] = str(value)
        if libc.mallopt(parameter, value) == 1:
            applied.append(name)
    return applied
