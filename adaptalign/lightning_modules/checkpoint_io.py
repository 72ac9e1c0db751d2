"""Checkpoints written whole or not at all.

Lightning's default writer streams the checkpoint straight into its final file, so a run killed
while writing (out of memory, a pre-empted job, a SIGKILL) leaves a truncated ``last.ckpt`` that
replaced the good one and cannot be resumed from. :class:`AtomicCheckpointIO` writes it with
:func:`~adaptalign.common.atomic_files.atomic_open` instead, which also clears away the
temporary files of writers that were killed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fsspec.core import strip_protocol
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from adaptalign.common.atomic_files import atomic_open


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
        with atomic_open(Path(strip_protocol(str(path)))) as file:  # also file:// addresses
            torch.save(checkpoint, file)
