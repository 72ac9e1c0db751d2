"""A callback for ``gpu_check.py``: when each training step ends, and each device's peak memory.

Passed to ``adaptalign fit`` as ``--trainer.callbacks+=gpu_check_probe.StepRecorder`` with
``--trainer.callbacks.output_dir=DIR`` (``benchmarks/`` on ``PYTHONPATH``). Every process writes
``DIR/rank<R>.json`` when training ends, so no collective call is needed: a rank that fails simply
leaves no file, and the check says so instead of waiting on it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


def rows_in(batch: Any) -> int | None:
    """The number of pairs in a batch: the length of its first tensor with a batch dimension."""
    values = list(batch.values()) if isinstance(batch, dict) else list(batch)
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    return None


class StepRecorder(L.Callback):
    """Records ``[global_step, epoch, seconds]`` after every optimiser step of this process.

    On CUDA it waits for the device's queued work before reading the clock, so a timestamp marks
    the step's real end, not when its kernels were queued.

    Args:
        output_dir: the folder for ``rank<R>.json`` (created).
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.steps: list[list[float]] = []
        self.batch_size: int | None = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.steps.append([trainer.global_step, trainer.current_epoch, time.perf_counter()])
        if self.batch_size is None:
            self.batch_size = rows_in(batch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        record: dict[str, Any] = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "device": str(device),
            "batch_size": self.batch_size,
            "steps": self.steps,
        }
        if device.type == "cuda":
            record["name"] = torch.cuda.get_device_name(device)
            record["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
            record["max_memory_reserved"] = torch.cuda.max_memory_reserved(device)
        folder = Path(self.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record) + "\n")
