"""A run's ``adaptalign fit`` inside the calling process: what makes a warm worker warm.

A fresh ``adaptalign fit`` process spends most of a frozen-feature run importing torch, Lightning,
timm and sentence-transformers; a worker that calls the Lightning CLI itself pays that once. The
run's output goes to its log at the file-descriptor level, so Lightning's log handlers, tqdm and
C++ warnings land there too, exactly as in a process of its own; its exit status follows the
command line's policy. Runs that launch processes themselves (DDP over several devices) cannot
run this way: :func:`needs_own_process` says which.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from adaptalign.common.exit_status import reported_status


@contextlib.contextmanager
def output_to(log_path: Path, append: bool) -> Iterator[None]:
    """Standard output and error (file descriptors 1 and 2) go to ``log_path`` meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log_path.open("a" if append else "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def fit_status(arguments: Sequence[str]) -> int:
    """``adaptalign fit ARGUMENTS`` here; its exit status as the console would give it."""
    from adaptalign.lightning_cli.cli import main as lightning_main

    command_line = sys.argv
    sys.argv = ["adaptalign", "fit", *arguments]  # what the Lightning CLI reads, as in a console
    try:
        lightning_main(["fit", *arguments])
    except SystemExit as exc:  # jsonargparse ends a bad option this way
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:
        status = reported_status(exc)
        if status is None:
            traceback.print_exc()
            return 1
        return status
    finally:
        sys.argv = command_line
        gc.collect()  # the run's system, data and trainer go now, not at the next run
    return 0


def fit_here(arguments: Sequence[str], log_path: Path, append: bool = False) -> int:
    """:func:`fit_status` with everything it prints going to ``log_path``."""
    with output_to(log_path, append):
        return fit_status(arguments)


def needs_own_process(arguments: Sequence[str], gpus: float) -> bool:
    """Whether the run launches processes of its own (several devices or machines).

    Reads ``trainer.devices`` and ``trainer.num_nodes`` from the ``--config`` layers and the
    command-line overrides, the last one winning as in the Lightning CLI.
    """
    if gpus > 1:
        return True
    settings: dict[str, Any] = {}
    for index, argument in enumerate(arguments):
        if argument == "--config" and index + 1 < len(arguments):
            settings.update(trainer_settings(Path(arguments[index + 1])))
        for key in ("devices", "num_nodes"):
            option = f"--trainer.{key}"
            if argument.startswith(f"{option}="):
                settings[key] = yaml.safe_load(argument.partition("=")[2])
            elif argument == option and index + 1 < len(arguments):
                settings[key] = yaml.safe_load(arguments[index + 1])
    return several(settings.get("devices")) or several(settings.get("num_nodes"))


def trainer_settings(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}  # the fit that reads it reports what is wrong
    trainer = document.get("trainer") if isinstance(document, dict) else None
    if not isinstance(trainer, dict):
        return {}
    return {key: trainer[key] for key in ("devices", "num_nodes") if key in trainer}


def several(value: Any) -> bool:
    """A device or node count above one: ``2``, ``"4"``, ``[0, 1]`` or ``"0,1"``."""
    if isinstance(value, list):
        return len(value) > 1
    if isinstance(value, str) and "," in value:
        return len([part for part in value.split(",") if part.strip()]) > 1
    try:
        return int(value) > 1
    except (TypeError, ValueError):
        return False  # "auto", -1 and None: as many as the worker sees, which is its own share
