"""Writes one JSON per training run with its best and last validation metrics.

Comparisons across configs, seeds and data sizes read these files instead of parsing logs; the
file appears only when ``fit`` ends, so its presence also marks a run as finished.

``wall_seconds`` adds up the time of every attempt at a run. A checkpoint carries the time up to
its writing, and each attempt that ends (finished, or stopped by an error or Ctrl-C) records its
total in a clock file beside the summary, so an attempt that resumes from a checkpoint also counts
what the previous attempt spent after writing it. Only an attempt killed outright loses the time
since its last checkpoint.

A run with a report split (a selection split carved by ``data.selection_images``, or
``data.report_split: test``) selects on ``val`` and is reported on ``test``: the command line
evaluates the selected checkpoint once on the report split after fit, and the summary, then
written, carries that evaluation under ``report``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from adaptalign.callbacks.collapse_watch import CollapseWatch
from adaptalign.common.atomic_files import atomic_save
from adaptalign.lightning_modules.metric_names import RSUM

PREFIX = "val/"
REPORT_PREFIX = "test/"
# The clock ``wall_seconds`` counts with (tests replace it, so no result depends on timing).
clock = time.monotonic


def best_entry(history: list[dict[str, Any]], key: str = RSUM) -> dict[str, Any] | None:
    """The validation with the highest ``key``; the earliest wins a tie, like ModelCheckpoint."""
    scored = [entry for entry in history if entry.get(key) is not None]
    if not scored:
        return None
    return max(scored, key=lambda entry: entry[key])  # max keeps the first of equal values


def report_entry(
    summary: dict[str, Any], trainer: L.Trainer, splits: dict[str, Any] | None
) -> dict[str, Any]:
    """The report split's metrics, the split they are on and the epoch selected on ``val``.

    The checkpoint ``test`` loaded is the best by ``val/rsum`` (the epoch of ``best``); without
    one, the model as fit left it was evaluated (the epoch of ``last``).
    """
    checkpoint = trainer.ckpt_path
    selected = (summary["best"] if checkpoint else summary["last"]) or {}
    entry: dict[str, Any] = {
        "split": "test",
        "selected_on": "val",
        "selected_by": f"best {PREFIX}{RSUM}" if checkpoint else "last epoch",
        "epoch": selected.get("epoch"),
        "step": selected.get("step"),
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    if splits is not None:
        entry["splits"] = splits
    for key, value in trainer.callback_metrics.items():
        if key.startswith(REPORT_PREFIX):
            entry[key[len(REPORT_PREFIX) :]] = float(value)
    return entry


class RunSummary(L.Callback):
    """Records every validation of ``fit`` and writes ``best``, ``last`` and ``history`` at its end.

    ``best`` is the validation with the highest ``val/rsum``: model selection on the validation
    split itself, so it is an optimistic (dev) figure. The history travels in checkpoints, so a run
    resumed from one still writes a complete summary; ``wall_seconds`` adds up across resumptions
    (see the module's docstring), with the help of ``<summary>.clock.json`` beside the summary.
    With ``report_follows`` (set by the command line when fit is followed by the report split's
    evaluation) the summary is kept at the end of fit and written, with ``report``, when that
    evaluation ends, so a run is finished only once it has been reported.

    Args:
        output_path: the JSON file to write (its folder is created).
    """

    def __init__(self, output_path: str) -> None:
        self.output_path = output_path
        self.history: list[dict[str, Any]] = []
        self.previous_seconds = 0.0
        self.started: float | None = None
        # Names the chain of attempts that continue one another, so a clock file left by another
        # run at the same path is never added in.
        self.run_id: str | None = None
        self.report_follows = False
        # The summary as fit left it, and the clock then, while the report evaluation runs: that
        # evaluation restores the selected checkpoint's callback states, history included.
        self.fitted: dict[str, Any] | None = None
        self.fit_ended: float = 0.0

    @property
    def clock_path(self) -> Path:
        path = Path(self.output_path)
        return path.with_name(f"{path.stem}.clock{path.suffix}")

    def wall_seconds(self) -> float:
        elapsed = 0.0 if self.started is None else clock() - self.started
        return self.previous_seconds + elapsed

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = clock()
        if self.run_id is None:
            self.run_id = uuid.uuid4().hex

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
        summary = {
            "best": best_entry(self.history),
            "last": self.history[-1] if self.history else None,
            "history": self.history,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "train_size": _train_size(trainer),
            "wall_seconds": round(self.wall_seconds(), 3),
            "seed": int(seed) if seed is not None else None,
        }
        # ``collapsed`` and the flagged epochs, when the run watched for a collapse
        for callback in getattr(trainer, "callbacks", []):
            if isinstance(callback, CollapseWatch):
                summary.update(callback.summary())
        return summary

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        summary = self.summary(trainer)
        if self.report_follows:
            self.fitted, self.fit_ended = summary, clock()
            return
        self._write(summary)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The report split's evaluation after fit: the summary is written now, with it."""
        if self.fitted is None or not trainer.is_global_zero:
            return
        summary, self.fitted = self.fitted, None
        describe = getattr(trainer.datamodule, "report_splits", None)
        splits = describe() if callable(describe) else None
        summary["report"] = report_entry(summary, trainer, splits)
        summary["wall_seconds"] = round(summary["wall_seconds"] + clock() - self.fit_ended, 3)
        self._write(summary)

    def _write(self, summary: dict[str, Any]) -> None:
        # Written whole or not at all: a half-written summary would mark a run as finished.
        atomic_save(self.output_path, json.dumps(summary, indent=2) + "\n")
        self._record_clock(summary["wall_seconds"])

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not trainer.is_global_zero:
            return
        if self.fitted is not None:  # the report evaluation failed; fit's time still counts
            self._record_clock(self.fitted["wall_seconds"] + clock() - self.fit_ended)
        elif self.started is not None:
            self._record_clock(self.wall_seconds())

    def _record_clock(self, seconds: float) -> None:
        record = {"run_id": self.run_id, "wall_seconds": seconds}
        atomic_save(self.clock_path, json.dumps(record) + "\n")

    def _recorded_seconds(self) -> float:
        """The total an earlier attempt of this run recorded when it ended; 0 if none did."""
        try:
            record = json.loads(self.clock_path.read_text())
            if self.run_id is not None and record["run_id"] == self.run_id:
                return float(record["wall_seconds"])
        except (OSError, ValueError, TypeError, KeyError):
            pass
        return 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "wall_seconds": self.wall_seconds(),
            "run_id": self.run_id,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.run_id = state_dict.get("run_id")
        # The checkpoint knows the time up to its writing; the attempt that wrote it may have
        # gone on for a while (to the end of fit, say) and recorded that in the clock file.
        self.previous_seconds = max(
            float(state_dict.get("wall_seconds", 0.0)), self._recorded_seconds()
        )
        if self.started is not None:  # the clock restarts from the restored time
            self.started = clock()


def _train_size(trainer: L.Trainer) -> int | None:
    """Images in the training set actually used (a fraction or the full split resolved)."""
    try:
        return len(trainer.train_dataloader.dataset)
    except (AttributeError, TypeError):
        return None
