"""Warns when a run collapses without a NaN: its loss pinned at chance, its retrieval at chance.

A model whose embeddings no longer tell pairs apart (every image and caption mapped to one point,
projections a learning rate has killed) trains on without an error: with all similarities equal,
each InfoNCE row is a uniform softmax over its ``N`` candidates and its loss is exactly ``log N``,
and validation recall is that of a random ranking. :class:`CollapseWatch` checks both after every
epoch, warns (:class:`~adaptalign.common.errors.CollapseWarning`), logs ``collapse/flag``
and keeps the flagged epochs, which :class:`~adaptalign.callbacks.run_summary.RunSummary` writes
into ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from adaptalign.common.errors import CollapseWarning, ConfigurationError
from adaptalign.lightning_modules.controls import ControlledSystem
from adaptalign.lightning_modules.gather import all_reduce_sum
from adaptalign.lightning_modules.metric_names import RSUM, recall_k

PREFIX = "val/"


def chance_recall(k: int, num_images: int, num_texts: int) -> tuple[float, float]:
    """R@K in % of a random ranking: (image->text, text->image).

    A caption's image is among the top ``k`` of ``num_images`` with probability ``k / num_images``.
    An image is found when any of its ``c = num_texts / num_images`` captions (the mean count) is
    among the top ``k`` of all captions: ``1 - C(T - c, k) / C(T, k)``, about ``k / num_images``.
    """
    if num_images < 1 or num_texts < num_images:
        raise ValueError(f"expected 1 <= images <= texts; got {num_images} and {num_texts}")
    text_to_image = min(k, num_images) / num_images
    per_image = num_texts / num_images
    missed = 1.0
    for j in range(min(k, num_texts)):
        missed *= max(0.0, (num_texts - per_image - j) / (num_texts - j))
    return 100 * (1 - missed), 100 * text_to_image


def chance_rsum(ks: Iterable[int], num_images: int, num_texts: int) -> float:
    """The rsum (both directions' R@K summed over ``ks``) a random ranking scores."""
    return sum(sum(chance_recall(k, num_images, num_texts)) for k in ks)


class CollapseWatch(L.Callback):
    """Flags epochs whose training loss or validation retrieval sits at chance level.

    * Loss (InfoNCE only): every step of the epoch has a mean row loss (both directions) within
      ``loss_tolerance`` of ``log N``, ``N`` the step's global batch (the candidates of each row).
      An untrained model starts above ``log N`` (its random similarities spread the softmax
      unevenly) and a learning one falls below it, so only a model at chance stays there.
    * Validation: rsum at or below a random ranking's, from the split's image and caption counts
      (:func:`chance_rsum`; ties count against a query, so coinciding embeddings score 0).

    Each warns once per epoch; ``collapse/flag`` (1 or 0) is logged after every training epoch,
    with ``collapse/loss_gap`` (the epoch's mean ``loss - log N``) and ``collapse/chance_rsum``.

    Args:
        loss_tolerance: how close to ``log N`` (in nats) every step's loss must stay.
    """

    def __init__(self, loss_tolerance: float = 0.01) -> None:
        if (
            isinstance(loss_tolerance, bool)
            or not isinstance(loss_tolerance, int | float)
            or not loss_tolerance > 0
        ):
            raise ConfigurationError(f"loss_tolerance={loss_tolerance!r}; expected a number > 0")
        self.loss_tolerance = float(loss_tolerance)
        self.flagged: list[dict[str, Any]] = []
        self.last_flag: bool | None = None
        self._steps: list[Tensor] = []
        self._validation: dict[str, Any] | None = None
        self._counts = torch.zeros(2)

    # ----------------------------------------------------------------- training loss
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps = []
        self._validation = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: ControlledSystem,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        stats = outputs.get("statistics") if isinstance(outputs, dict) else None
        if stats is None or pl_module.criterion != "infonce":
            return
        loss_sum = ((stats.row_losses_i2t.sum() + stats.row_losses_t2i.sum()) / 2).float()
        # new_full fills on the loss's device; new_tensor would copy from the host and wait there
        # for the step's queued work, every step.
        rows = loss_sum.new_full((), stats.row_losses_i2t.numel())
        self._steps.append(torch.stack([loss_sum, rows]))

    def loss_gaps(self) -> Tensor | None:
        """Each step's mean loss minus ``log N``, over all processes' rows; None without steps.

        A collective call: every process must make it (each runs the same steps).
        """
        if not self._steps:
            return None
        totals = all_reduce_sum(torch.stack(self._steps))  # per step: loss sum, rows
        return totals[:, 0] / totals[:, 1] - totals[:, 1].log()

    # ----------------------------------------------------------------- validation
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._counts = torch.zeros(2)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx == 0 and isinstance(batch, dict) and "text_image_id" in batch:
            self._counts += torch.tensor(
                [batch["image_id"].numel(), batch["text_image_id"].numel()]
            )

    # on_validation_end: the module computes and logs the retrieval metrics in its own
    # on_validation_epoch_end, which runs after the callbacks' one.
    def on_validation_end(self, trainer: L.Trainer, pl_module: ControlledSystem) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        images, texts = (int(v) for v in all_reduce_sum(self._counts.to(pl_module.device)).tolist())
        ks = sorted(
            k
            for key in trainer.callback_metrics
            if key.startswith(PREFIX) and (k := recall_k(key[len(PREFIX) :], "i2t")) is not None
        )
        rsum = trainer.callback_metrics.get(f"{PREFIX}{RSUM}")
        if rsum is None or not ks or images < 1 or texts < images:
            return
        chance = chance_rsum(ks, images, texts)
        self._validation = {"rsum": float(rsum), "chance_rsum": chance}
        if float(rsum) <= chance:
            rank_zero_warn(
                f"validation rsum {float(rsum):.1f} at epoch {trainer.current_epoch} is at or "
                f"below chance ({chance:.1f} for {images} images and {texts} captions): retrieval "
                "is no better than a random ranking; the run may have collapsed",
                category=CollapseWarning,
            )

    # ----------------------------------------------------------------- the epoch's verdict
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ControlledSystem) -> None:
        epoch = trainer.current_epoch
        gaps = self.loss_gaps()
        record: dict[str, Any] = {"epoch": epoch, "loss_at_chance": False, "loss_gap": None}
        if gaps is not None:
            record["loss_gap"] = float(gaps.mean())
            record["loss_at_chance"] = bool(gaps.abs().max() <= self.loss_tolerance)
            pl_module.log("collapse/loss_gap", record["loss_gap"], sync_dist=True)
        if record["loss_at_chance"]:
            rank_zero_warn(
                f"training may have collapsed: at every step of epoch {epoch} the InfoNCE loss "
                f"stayed within {self.loss_tolerance:g} of log(batch size), its value when every "
                f"similarity is equal (mean gap {record['loss_gap']:+.4f}); the towers no longer "
                "tell pairs apart. Check the learning rate, the temperature and the projections",
                category=CollapseWarning,
            )
        validation = self._validation or {}
        record.update(rsum=validation.get("rsum"), chance_rsum=validation.get("chance_rsum"))
        record["rsum_at_chance"] = False
        if validation:
            record["rsum_at_chance"] = validation["rsum"] <= validation["chance_rsum"]
            pl_module.log("collapse/chance_rsum", validation["chance_rsum"], sync_dist=True)
        flag = record["loss_at_chance"] or record["rsum_at_chance"]
        pl_module.log("collapse/flag", float(flag), sync_dist=True)
        self.last_flag = flag
        if flag:
            self.flagged.append(record)
        self._steps, self._validation = [], None

    def summary(self) -> dict[str, Any]:
        """For ``summary.json``: whether the last epoch was flagged, and every flagged epoch."""
        return {"collapsed": bool(self.last_flag), "collapse_epochs": list(self.flagged)}

    def state_dict(self) -> dict[str, Any]:
        return {"flagged": list(self.flagged), "last_flag": self.last_flag}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.flagged = list(state_dict.get("flagged", []))
        self.last_flag = state_dict.get("last_flag")
