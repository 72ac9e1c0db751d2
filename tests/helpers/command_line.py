"""``adaptalign`` as a user runs it: its own process, one thread per process, a test's cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_adaptalign(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m adaptalign ARGS`` in ``cwd``; its output captured as text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADAPTALIGN_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "adaptalign", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=cwd,
    )
