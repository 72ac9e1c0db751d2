"""Callbacks log on exactly the steps Lightning writes, read from public counters only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from adaptalign.callbacks.log_steps import still_writes, writes_logs
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.generated import GeneratedConfig
from tests.helpers.builders import quiet_trainer, tiny_module


class Rows(Logger):
    """Keeps every row of metrics Lightning writes, with its step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, set[str]]] = []

    @property
    def name(self) -> str:
        return "rows"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), set(metrics)))

    def written(self, key: str) -> list[int]:
        return [step for step, keys in self.rows if key in keys]


class Probe(L.Callback):
    """Logs at both ends of a batch when the helpers say the batch's logs are written."""

    def __init__(self) -> None:
        self.calls = 0
        self.decided = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.decided = writes_logs(trainer)
        if self.decided:
            self.calls += 1
            pl_module.log("probe/start", 1.0, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if still_writes(trainer, self.decided):
            self.calls += 1
            pl_module.log("probe/end", 1.0, on_step=True, on_epoch=False)


class StopAt(L.Callback):
    """Asks the trainer to stop at the end of one global step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def fit(
    text_model: str,
    tmp_path: Path,
    max_epochs: int,
    ckpt_path: str | None = None,
    stop: int | None = None,
) -> tuple[Rows, Probe]:
    """A fit that writes every 4th step's logs, with a checkpoint at every epoch's end."""
    rows, probe = Rows(), Probe()
    data = AlignmentDataModule(
        generated=GeneratedConfig(num_train=48, num_val=8, num_test=8, image_size=32),
        cache_dir=str(tmp_path / "cache"),
        batch_size=8,
    )
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    callbacks = [checkpoints] + ([StopAt(stop)] if stop is not None else []) + [probe]
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        logger=rows,
        log_every_n_steps=4,
        enable_checkpointing=True,
        callbacks=callbacks,
    )
    trainer.fit(tiny_module(text_model), data, ckpt_path=ckpt_path)
    return rows, probe


@pytest.mark.slow
def test_callbacks_log_on_the_written_steps_only(tiny_text_model: str, tmp_path: Path) -> None:
    rows, probe = fit(
        tiny_text_model, tmp_path, max_epochs=2
    )  # 6 steps an epoch, every 4th written
    written = rows.written("train/loss")
    assert written == [3, 7, 11]  # Lightning's own on-step value, steps counted from 0
    assert rows.written("probe/start") == rows.written("probe/end") == written
    assert probe.calls == 2 * len(written)  # no call on a step whose logs are not written
    # A run resumed from the checkpoint at the end of epoch 0 counts on from there.
    first = str(tmp_path / "ckpt" / "epoch=0.ckpt")
    resumed, probe = fit(tiny_text_model, tmp_path, max_epochs=3, ckpt_path=first)
    written = resumed.written("train/loss")
    assert written == [7, 11, 15]
    assert resumed.written("probe/start") == resumed.written("probe/end") == written
    assert probe.calls == 2 * len(written)


def test_the_batch_a_stop_is_asked_on_is_written(tiny_text_model: str, tmp_path: Path) -> None:
    rows, _ = fit(
        tiny_text_model, tmp_path, max_epochs=2, stop=2
    )  # stop after the third step (global step 2)
    assert rows.written("train/loss") == [1]  # written, though its step 2 is no multiple of 4
    assert rows.written("probe/end") == [1] and rows.written("probe/start") == []
