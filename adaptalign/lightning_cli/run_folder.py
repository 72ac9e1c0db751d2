"""Where a command writes: a ``version_N`` folder of its own, the folder of the run it resumes, or
an evaluation folder inside the run whose checkpoint it evaluates.

Lightning's TensorBoard logger picks ``version_N`` by listing the folder and creates it only when
it first writes, so two ``fit`` runs started together under one name pick the same N and mix their
event files, configs and checkpoints. Here the folder is claimed with ``os.mkdir``, which succeeds
for one process only, and the logger is given the folder it claimed.

A ``fit`` resumed from ``<root>/version_K/checkpoints/*.ckpt`` logs on in ``version_K``, so its
TensorBoard history and checkpoints stay in one place. ``validate``, ``test`` and ``predict`` of a
checkpoint in ``<run>/checkpoints/`` write to ``<run>/<command>/version_N``: beside the run they
evaluate, never as one more run beside it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

VERSION = re.compile(r"^version_(\d+)$")
EVALUATIONS = ("validate", "test", "predict")


def existing_versions(root: Path) -> list[int]:
    """The numbers N of the ``version_N`` folders in ``root``."""
    if not root.is_dir():
        return []
    found = (VERSION.match(entry.name) for entry in root.iterdir() if entry.is_dir())
    return [int(match.group(1)) for match in found if match]


def claim_version(root: Path) -> Path:
    """Creates the next free ``version_N`` folder in ``root`` and returns it.

    Another process may take a number between the listing and the ``mkdir``; the ``mkdir`` then
    fails for this one, which tries the next number, so no two callers ever get the same folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    number = max(existing_versions(root), default=-1) + 1
    while True:
        folder = root / f"version_{number}"
        try:
            os.mkdir(folder)
        except FileExistsError:
            number += 1
            continue
        return folder


def tensorboard_arguments(logger: Any, default_root_dir: str | None) -> dict[str, Any] | None:
    """The TensorBoard logger a config asks for, as ``class`` plus keyword arguments.

    ``None`` or ``True`` is Lightning's default logger (TensorBoard under ``default_root_dir``);
    another logger, several loggers or none at all give ``None``: their folders are left alone.
    """
    if logger is None or logger is True:
        save_dir = default_root_dir or os.getcwd()
        return {"class": TensorBoardLogger, "save_dir": save_dir, "name": "lightning_logs"}
    if isinstance(logger, Namespace):
        logger = logger.as_dict()
    if not isinstance(logger, dict) or "class_path" not in logger:
        return None
    module, _, name = logger["class_path"].rpartition(".")
    cls = getattr(import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, TensorBoardLogger)):
        return None
    return {"class": cls, **logger.get("init_args", {}), **logger.get("dict_kwargs", {})}


@dataclass(frozen=True)
class Destination:
    """The logger's folder settings for one command, and what to tell the user about them."""

    save_dir: str
    name: str
    version: str | None  # None: claim the next free version_N (done on global rank 0 only)
    note: str | None = None  # said with the folder, when a checkpoint decided it


def destination(
    command: str | None, arguments: dict[str, Any], ckpt_path: str | None
) -> Destination:
    """Where a command with these TensorBoard arguments and this checkpoint writes."""
    save_dir = str(arguments["save_dir"])
    name = "" if arguments.get("name") is None else str(arguments["name"])
    version = arguments.get("version")
    if version is not None:  # chosen by the user (``adaptalign compare`` resumes this way)
        chosen = version if isinstance(version, str) else f"version_{version}"
        return Destination(save_dir, name, chosen)
    if not ckpt_path or not Path(ckpt_path).is_file():
        return Destination(save_dir, name, None)
    checkpoint = Path(ckpt_path).resolve()
    run = checkpoint.parent.parent
    in_run = checkpoint.parent.name == "checkpoints"
    if command in EVALUATIONS and in_run:
        return Destination(str(run), command, None, f"{command} of {ckpt_path}")
    root = Path(save_dir, name).resolve()
    if command != "fit":
        return Destination(save_dir, name, None, f"{command} of {ckpt_path}")
    if in_run and run.parent == root:
        return Destination(save_dir, name, run.name, f"fit: resuming {ckpt_path} in its own run")
    note = (
        f"fit: resuming {ckpt_path}, which is not in the checkpoints/ folder of a run under {root}"
    )
    return Destination(save_dir, name, None, note)


def run_logger(
    command: str | None,
    arguments: dict[str, Any],
    ckpt_path: str | None,
    rank_zero: bool,
) -> TensorBoardLogger:
    """The TensorBoard logger for a command; on global rank 0 its version folder is claimed.

    Other ranks get rank 0's folder from Lightning's broadcast of the log and checkpoint folders.
    ``hp_metric``, a placeholder TensorBoard shows as -1, is not logged.
    """
    where = destination(command, arguments, ckpt_path)
    version = where.version
    if rank_zero:
        if version is None:
            version = claim_version(Path(where.save_dir, where.name)).name
        if where.note:
            print(f"{where.note}; logging to {Path(where.save_dir, where.name, version)}")
    fixed = ("class", "save_dir", "name", "version", "default_hp_metric")
    settings = {key: value for key, value in arguments.items() if key not in fixed}
    return arguments["class"](
        save_dir=where.save_dir,
        name=where.name,
        version=version,
        default_hp_metric=False,
        **settings,
    )


def command_logger(
    command: str | None, trainer: Namespace | dict[str, Any], ckpt_path: str | None
) -> TensorBoardLogger | None:
    """The logger a command runs with, or ``None`` to keep the one its config gives.

    Only TensorBoard loggers (Lightning's default included) are placed; ``fast_dev_run`` and
    ``barebones`` runs write no logs, so they claim no folder.
    """
    if trainer.get("fast_dev_run") or trainer.get("barebones"):
        return None
    arguments = tensorboard_arguments(trainer.get("logger"), trainer.get("default_root_dir"))
    if arguments is None:
        return None
    return run_logger(command, arguments, ckpt_path, rank_zero=rank_zero_only.rank == 0)
