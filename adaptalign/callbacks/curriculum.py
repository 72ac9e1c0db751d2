"""The object curriculum: from batches of many objects to batches of one object.

Each epoch the callback sets the share of same-object batches of the training data's
:class:`~adaptalign.datamodules.curriculum_sampler.CurriculumBatchSampler`, and its epoch, before
the epoch's batches are drawn:

* ``switch``: ``start_share`` before ``switch_epoch``, ``end_share`` from it on (the two-phase
  recipe: object-level alignment first, then contextual alignment);
* ``ramp``: linear from ``start_share`` at epoch 0 to ``end_share`` at epoch ``ramp_epochs - 1``,
  and ``end_share`` after it. ``ramp_epochs=1`` starts at ``end_share`` right away.

The share depends on the epoch only, and the settings (with the ramp length resolved from the
trainer) are checkpointed, so a resumed run draws exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from adaptalign.common.checks import is_int, is_number
from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.curriculum_sampler import CurriculumBatchSampler, batch_purity
from adaptalign.datamodules.shard_curriculum import BufferCurriculum
from adaptalign.lightning_modules.controls import ControlledSystem

Schedule = Literal["switch", "ramp"]
SCHEDULES = ("switch", "ramp")
SETTINGS = ("schedule", "switch_epoch", "start_share", "end_share", "ramp_epochs")


def _check_share(name: str, value: object) -> float:
    ok = is_number(value)
    if not ok or not math.isfinite(value) or not 0 <= value <= 1:  # type: ignore[arg-type]
        raise ConfigurationError(
            f"ObjectCurriculum {name}={value!r}; expected a number from 0 to 1"
        )
    return float(value)  # type: ignore[arg-type]


def _loaders(value: Any) -> Iterator[Any]:
    """Every loader in what ``trainer.train_dataloader`` returns (one, a list or a dict)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _loaders(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _loaders(item)
    elif value is not None:
        yield value


Curriculum = CurriculumBatchSampler | BufferCurriculum


def find_sampler(trainer: L.Trainer) -> Curriculum:
    """The curriculum of the trainer's training data, or a clear error: the batch sampler of
    pairs in memory, or the batcher of pairs streamed from shards."""
    for loader in _loaders(trainer.train_dataloader):
        sampler = getattr(loader, "batch_sampler", None)
        if isinstance(sampler, CurriculumBatchSampler):
            return sampler
        batcher = getattr(getattr(loader, "dataset", None), "batcher", None)
        if isinstance(batcher, BufferCurriculum):
            return batcher
    found = [
        type(getattr(loader, "batch_sampler", None)).__name__
        for loader in _loaders(trainer.train_dataloader)
        if isinstance(loader, DataLoader)
    ]
    raise ConfigurationError(
        "ObjectCurriculum needs the training DataLoader to batch with a CurriculumBatchSampler "
        f"(found batch samplers: {', '.join(found) or 'none'}); set the data module's sampler to "
        "'curriculum' (and the trainer's use_distributed_sampler to false)"
    )


class ObjectCurriculum(L.Callback):
    """Raises the share of same-object batches over the epochs.

    Args:
        schedule: ``switch`` (a step at ``switch_epoch``) or ``ramp`` (linear).
        switch_epoch: first epoch trained at ``end_share`` with the ``switch`` schedule.
        start_share, end_share: share of same-object batches at the start and at the end.
        ramp_epochs: epochs the ramp takes (default: the trainer's ``max_epochs``).
        log_purity: log each training batch's purity (share of its pairs showing its most common
            object) as ``curriculum/batch_purity``; a check that the sampler does what it should.
    """

    def __init__(
        self,
        schedule: Schedule = "ramp",
        switch_epoch: int = 1,
        start_share: float = 0.0,
        end_share: float = 1.0,
        ramp_epochs: int | None = None,
        log_purity: bool = True,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ConfigurationError(
                f"ObjectCurriculum schedule={schedule!r}; expected one of {', '.join(SCHEDULES)}"
            )
        if not is_int(switch_epoch) or switch_epoch < 0:
            raise ConfigurationError(
                f"ObjectCurriculum switch_epoch={switch_epoch!r}; expected an integer >= 0"
            )
        if ramp_epochs is not None and (not is_int(ramp_epochs) or ramp_epochs < 1):
            raise ConfigurationError(
                f"ObjectCurriculum ramp_epochs={ramp_epochs!r}; expected an integer >= 1 or null "
                "(the trainer's max_epochs)"
            )
        self.schedule = schedule
        self.switch_epoch = switch_epoch
        self.start_share = _check_share("start_share", start_share)
        self.end_share = _check_share("end_share", end_share)
        self.ramp_epochs = ramp_epochs
        self.log_purity = log_purity
        self.resolved_ramp_epochs: int | None = ramp_epochs
        self.last_epoch: int | None = None
        self._restored = False

    # ------------------------------------------------------------------ schedule
    def share(self, epoch: int) -> float:
        """The share of same-object batches in ``epoch`` (counted from 0)."""
        if self.schedule == "switch":
            return self.start_share if epoch < self.switch_epoch else self.end_share
        length = self.resolved_ramp_epochs
        if length is None:
            raise ConfigurationError(
                "ObjectCurriculum ramp_epochs is unset and no trainer has set it from max_epochs "
                "yet; give ramp_epochs"
            )
        if length == 1 or epoch >= length - 1:
            return self.end_share
        fraction = max(epoch, 0) / (length - 1)
        return self.start_share + fraction * (self.end_share - self.start_share)

    # --------------------------------------------------------------------- hooks
    def resolve(self, trainer: L.Trainer) -> None:
        """Take the ramp length from the trainer's ``max_epochs`` unless given or restored."""
        if self.resolved_ramp_epochs is not None or self.schedule != "ramp":
            return
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ConfigurationError(
                "ObjectCurriculum with schedule 'ramp' needs ramp_epochs when the trainer has "
                f"no max_epochs (max_epochs={max_epochs!r})"
            )
        self.resolved_ramp_epochs = int(max_epochs)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._restored:  # a restored ramp length wins, so the resumed curve is the same
            self.resolved_ramp_epochs = self.ramp_epochs
        self._restored = False
        self.resolve(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Set up the run's first epoch, which a run resumed mid-epoch starts without
        ``on_train_epoch_start``; refuse a loader that drew its batches before.

        Lightning creates the training loader's iterator before the run's first epoch starts
        (when the optimiser's schedule asks for the number of steps, or before a resumed epoch)
        and does not create it again for that epoch. The data module's loader starts drawing at
        its first batch, after this hook, so the sampler plans the epoch with the curriculum's
        settings. A loader that draws at once (a plain DataLoader with workers) would train the
        epoch on batches planned with other settings, and Lightning offers no way to start its
        iteration again: that is an error, not a warning lost in the log.
        """
        sampler, epoch, share = self._configure(trainer)
        drawn = sampler.last_plan
        if drawn is not None and drawn != (epoch, share):
            raise ConfigurationError(
                f"the curriculum sampler drew batches (epoch {drawn[0]}, same_object_share "
                f"{drawn[1]:g}) before epoch {epoch} (share {share:g}) started; ObjectCurriculum "
                "needs a training loader that starts drawing at its first batch, as the data "
                "module's does (data.sampler: curriculum)"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: ControlledSystem) -> None:
        # Later epochs' iterators are created after this hook, so setting the sampler suffices.
        _, _, share = self._configure(trainer)
        pl_module.log(
            "curriculum/same_object_share", share, on_step=False, on_epoch=True, sync_dist=True
        )

    def _configure(self, trainer: L.Trainer) -> tuple[Curriculum, int, float]:
        sampler = find_sampler(trainer)
        epoch = trainer.current_epoch
        share = self.share(epoch)
        sampler.same_object_share = share
        sampler.set_epoch(epoch)  # Lightning only sets the epoch of samplers, not batch samplers
        self.last_epoch = epoch
        return sampler, epoch, share

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: ControlledSystem,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.log_purity or not isinstance(batch, dict) or "objects" not in batch:
            return
        objects = batch["objects"]
        pl_module.log(
            "curriculum/batch_purity",
            batch_purity(objects),
            on_step=True,
            on_epoch=True,
            batch_size=len(objects),
            sync_dist=True,  # each process sees its slice of the global batch
        )

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            **{name: getattr(self, name) for name in SETTINGS},
            "resolved_ramp_epochs": self.resolved_ramp_epochs,
            "last_epoch": self.last_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        changed = [n for n in SETTINGS if n in state_dict and state_dict[n] != getattr(self, n)]
        if changed:
            rank_zero_warn(
                f"ObjectCurriculum: the checkpoint's {', '.join(changed)} differ from the given "
                "settings; continuing with the checkpoint's so the resumed curriculum is unchanged"
            )
        for name in SETTINGS:
            if name in state_dict:
                setattr(self, name, state_dict[name])
        self.resolved_ramp_epochs = state_dict.get("resolved_ramp_epochs", self.ramp_epochs)
        self.last_epoch = state_dict.get("last_epoch")
        self._restored = True
