"""``adaptalign`` as a user runs it: its own process, one thread per process, a test's cache; or
``adaptalign compare`` in this process, its output captured."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Sequence
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


def compare_here(
    output: Path, text_model: str, args: Sequence[str], overrides: Sequence[str] = ()
) -> tuple[int, str, str]:
    """``adaptalign compare --seeds 0 1 --output OUTPUT ARGS --override`` with the tiny text
    model and ``overrides``, through the real entry point in this process; returns its exit
    status, stdout and stderr."""
    from adaptalign.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    argv = ["compare", "--seeds", "0", "1", "--output", str(output), *args, "--override"]
    argv += [f"--model.text_tower.model_name={text_model}", *overrides]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()
