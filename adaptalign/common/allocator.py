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
start-up, for every process it starts (data-loader workers, Ray workers, ``fit`` runs). Nothing
changes when the user already set when glibc returns freed memory (``MALLOC_MMAP_MAX_``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or their
``glibc.malloc`` tunables in ``GLIBC_TUNABLES``), when ``ADAPTALIGN_KEEP_FREED_MEMORY=0``, or on
another C library.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

# glibc's mallopt parameters (malloc.h) and the environment variables that set them at start-up.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
MALLOPT_SETTINGS = {
    "MALLOC_MMAP_MAX_": (M_MMAP_MAX, 0),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 1 << 30),
}
ENVIRONMENT = tuple(MALLOPT_SETTINGS)
SWITCH = "ADAPTALIGN_KEEP_FREED_MEMORY"


def glibc_library() -> ctypes.CDLL | None:
    """This process's C library when it is glibc with ``mallopt`` (the settings are glibc's)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


# What the user may have set that decides when glibc returns freed memory: any of these also
# stops glibc from adapting its mmap threshold, so ours would half-override theirs.
RELEASE_PARAMETERS = ("mmap_max", "mmap_threshold", "trim_threshold", "top_pad")


def malloc_configured(environment: Mapping[str, str]) -> bool:
    """Whether the environment sets when glibc returns freed memory (``MALLOC_MMAP_MAX_`` and the
    like, or their ``glibc.malloc`` tunables)."""
    tunables = environment.get("GLIBC_TUNABLES", "")
    return any(
        f"MALLOC_{name.upper()}_" in environment or f"glibc.malloc.{name}=" in tunables
        for name in RELEASE_PARAMETERS
    )


def keep_freed_memory() -> list[str]:
    """Applies the settings unless the user configured malloc or switched this off; the names of
    those applied, which are then exported for the processes this one starts."""
    if os.environ.get(SWITCH, "1") == "0" or malloc_configured(os.environ):
        return []
    libc = glibc_library()
    if libc is None:
        return []
    applied = []
    for name, (parameter, value) in MALLOPT_SETTINGS.items():
        if libc.mallopt(parameter, value) == 1:
            os.environ[name] = str(value)
            applied.append(name)
    return applied
