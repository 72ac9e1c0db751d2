"""Hands the system's image preprocessing and frozen towers to the data module.

The data module never reaches into the system (nor the system into the data): this callback sees
both, and at ``setup``, before any loader is built, gives the data module what it needs from the
system as :class:`~adaptalign.datamodules.model_inputs.ModelInputs`. The command line adds it to
every run; a trainer built in Python needs it in its callbacks.
"""

from __future__ import annotations

import lightning as L

from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.datasets import default_transform
from adaptalign.datamodules.model_inputs import ModelInputs


def model_inputs(system: L.LightningModule) -> ModelInputs:
    """The system's evaluation preprocessing and its towers' frozen parts: whole frozen towers,
    or the frozen prefixes of towers whose top trains (towers that train whole are left out, so
    their inputs stay raw); a system without an image tower gets the default preprocessing."""
    make = getattr(system, "image_transform", None)
    image_tower = getattr(system, "image_tower", None)
    text_tower = getattr(system, "text_tower", None)
    text_frozen = getattr(text_tower, "frozen", False)
    return ModelInputs(
        transform=make(False) if callable(make) else default_transform(),
        image_tower=image_tower if _has_frozen_part(image_tower) else None,
        text_backbone=text_tower.backbone if text_frozen else None,
        text_prefix=text_tower if _has_frozen_part(text_tower) and not text_frozen else None,
        train_transform=make(True) if callable(make) and _augments(image_tower) else None,
    )


def _augments(tower: object) -> bool:
    return bool(getattr(getattr(tower, "config", None), "augment", False))


def _has_frozen_part(tower: object) -> bool:
    return getattr(tower, "frozen", False) or getattr(tower, "split", None) is not None


class ModelInputsLink(L.Callback):
    """Gives an :class:`AlignmentDataModule` the system's inputs whenever a trainer sets up."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if isinstance(datamodule, AlignmentDataModule):
            datamodule.model_inputs = model_inputs(pl_module)
