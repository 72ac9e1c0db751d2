"""Writes one JSON per training run with its best and last validation metrics.

Comparisons across configs, seeds and data sizes read these files instead of parsing logs; the
file appears only when ``fit`` ends, so its presence also marks a run as finished.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from adaptalign.atomic_files import write_atomic

PREFIX = "val/"


def best_entry(history: list[dict[str, Any]], key: str = "rsum") -> dict[str, Any] | None:
    """The validation with the highest ``key``; the earliest wins a tie, like ModelCheckpoint."""
    scored = [entry for entry in history if entry.get(key) is not None]
    if not scored:
        return None
    return max(scored, key=lambda entry: entry[key])  # max keeps the first of equal values


class RunSummary(L.Callback):
    """Records every validation of ``fit`` and writes ``best``, ``last`` and ``history`` at its end.

    ``best`` is the validation with the highest ``val/rsum``: model selection on the validation
    split itself, so it is an optimistic (dev) figure. The history travels in checkpoints, so a run
    resumed from one still writes a complete summary; ``wall_seconds`` adds up across resumptions.

    Args:
        output_path: the JSON file to write (its folder is created).
    """

    def __init__(self, output_path: str) -> None:
        self.output_path = output_path
        self.history: list[dict[str, Any]] = []
        self.previous_seconds = 0.0
        self.started: float | None = None

    def wall_seconds(self) -> float:
        elapsed = 0.0 if self.started is None else time.monotonic() - self.started
        return self.previous_seconds + elapsed

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.monotonic()

    # on_validation_end, not on_validation_epoch_end: callbacks' epoch-end hooks run before the
    # module's, where the retrieval metrics are computed and logged.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        entry: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(PREFIX):
                entry[key[len(PREFIX) :]] = float(value)
        self.history.append(entry)

    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        seed = os.environ.get("PL_GLOBAL_SEED")
        return {
            "best": best_entry(self.history),
            "last": self.history[-1] if self.history else None,
            "history": self.history,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "train_size": _train_size(trainer),
            "wall_seconds": round(self.wall_seconds(), 3),
            "seed": int(seed) if seed is not None else None,
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # Written whole or not at all: a half-written summary would mark a run as finished.
        write_atomic(self.output_path, json.dumps(self.summary(trainer), indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "wall_seconds": self.wall_seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.previous_seconds = float(state_dict.get("wall_seconds", 0.0))
        if self.started is not None:  # the clock restarts from the restored time
            self.started = time.monotonic()


def _train_size(trainer: L.Trainer) -> int | None:
    """Images in the training set actually used (a fraction or the full split resolved)."""
    try:
        return len(trainer.train_dataloader.dataset)
    except (AttributeError, TypeError):
        return None
