"""Checkpoints written whole or not at all.

Lightning's default writer streams the checkpoint straight into its final file, so a run killed
while writing (out of memory, a pre-empted job, a SIGKILL) leaves a truncated ``last.ckpt`` that
replaced the good one and cannot be resumed from. :class:`AtomicCheckpointIO` writes to a
temporary file in the same folder, flushes it to disk and only then renames it over the target:
the name always holds either the previous checkpoint or the new one, complete. A process killed
mid-write leaves its temporary file behind (as large as a checkpoint); the next complete write of
the same checkpoint removes it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from fsspec.core import strip_protocol
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

TEMP_SUFFIX = ".tmp"


def temporary_path(target: Path) -> Path:
    """A unique hidden name beside ``target`` that never ends in ``.ckpt``.

    Nothing that looks for checkpoints (``*.ckpt``, ``last.ckpt``) can mistake a half-written
    file left by a killed process for one.
    """
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; folders cannot be opened for this outside POSIX."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_leftovers(target: Path) -> list[Path]:
    """Delete the temporary files of ``target`` whose writing processes no longer run.

    Files of running processes are left alone: another process may be writing them now.
    """
    removed = []
    for path in target.parent.glob(f".{target.name}.*{TEMP_SUFFIX}"):
        pid = path.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file, fsync, then ``os.replace`` onto the checkpoint's name.

    Remote paths (``s3://`` and the like) have no atomic rename; they are written as Lightning
    writes them.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options (got {storage_options!r})"
            )
        target = Path(strip_protocol(str(path)))  # also file:// addresses
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = temporary_path(target)
        try:
            with open(temporary, "xb") as file:  # "x": never another writer's file
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_folder(target.parent)
        remove_leftovers(target)
