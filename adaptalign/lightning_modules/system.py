"""The alignment system: two towers, a contrastive criterion, and the controls/statistics contract.

Nothing adaptive lives here. Callbacks write :class:`Controls` before a step; the step consumes them
(the next step starts from fresh defaults) and returns detached :class:`StepStatistics`, and what
the extra losses reported, beside the loss, so schedules, loss weights and modality weights compose
without touching this class. Validation returns its embeddings, for callbacks that show them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal, NamedTuple

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from adaptalign.common.errors import ConfigurationError, NonFiniteLossError
from adaptalign.lightning_modules import frozen_backbones, rng
from adaptalign.lightning_modules.controls import (
    Controls,
    LossTerm,
    StepEmbeddings,
    StepStatistics,
    scale_gradient,
)
from adaptalign.lightning_modules.gather import distributed_world, gather_with_grad
from adaptalign.lightning_modules.heads import HeadKind, HeadSpec
from adaptalign.lightning_modules.losses import info_nce, max_margin, step_statistics
from adaptalign.lightning_modules.metric_names import RSUM
from adaptalign.lightning_modules.nonfinite import checkpoint_note, controls_in_force
from adaptalign.lightning_modules.optimisation import (
    optimiser_with_schedule,
    parameter_groups,
    tower_sets,
)
from adaptalign.lightning_modules.retrieval import RetrievalMetric
from adaptalign.lightning_modules.towers import (
    ImageTower,
    ImageTowerConfig,
    TextTower,
    TextTowerConfig,
    tower_config,
)


class StepLoss(NamedTuple):
    """One step's loss (in the graph) and, detached, its logged parts, its statistics for the
    callbacks, and the auxiliaries extra losses returned, by name."""

    loss: Tensor
    parts: dict[str, Tensor]
    statistics: StepStatistics
    auxiliaries: dict[str, Any]


def _unit_rows(embeddings: Tensor) -> Tensor:
    """L2-normalised rows in float32, whatever precision the tower ran in."""
    return F.normalize(embeddings.float(), dim=-1)


class AlignmentModule(L.LightningModule):
    """Aligns an image tower and a text tower in a shared, L2-normalised embedding space.

    Args:
        image_tower: timm model settings. text_tower: text model settings.
        embed_dim: size of the shared space both projections map to.
        projection: each tower's trained head, ``linear`` or ``mlp`` (Linear, GELU, Linear);
            ``projection_hidden`` is the MLP's hidden width (default: the tower's feature width).
        criterion: ``infonce`` (symmetric, temperature-scaled) or ``max_margin`` (hinge ranking).
        temperature: initial (or fixed) InfoNCE temperature; ``learn_temperature`` makes it a
            parameter, clamped to ``temperature_bounds``.
        margin: max-margin hinge margin; ``hardest_negative`` uses the VSE++ max over negatives.
        lr, tower_lr: learning rates of projections (and temperature) and of unfrozen backbones;
            ``weight_decay`` applies to matrices only. ``tower_lr_decay`` < 1 decays a tower's
            learning rate with depth: its top (final norm, head, pooling) at ``tower_lr``, the
            block or layer below at ``tower_lr * decay``, the next at ``decay**2`` times, and so on.
        optimizer: ``adamw`` (decoupled weight decay) or ``sgd`` with ``momentum``, whose weight
            decay is an L2 term added to the gradient. Under AdamW a constant factor on a tower's
            gradients (ARL's modality weights) cancels; under SGD it scales the tower's steps.
            ``adam_betas``: AdamW's moving-average factors for the gradient and its square; a
            lower second factor forgets the first steps' gradients sooner.
        warmup: warm-up length, a fraction of all steps if < 1 else a step count; then cosine decay
            to ``min_lr_ratio`` times the peak.
        eval_chunk_size: images per similarity chunk in retrieval evaluation.
    """

    def __init__(
        self,
        image_tower: ImageTowerConfig | None = None,
        text_tower: TextTowerConfig | None = None,
        embed_dim: int = 256,
        projection: HeadKind = "linear",
        projection_hidden: int | None = None,
        criterion: Literal["infonce", "max_margin"] = "infonce",
        temperature: float = 0.07,
        learn_temperature: bool = True,
        temperature_bounds: tuple[float, float] = (0.01, 1.0),
        margin: float = 0.2,
        hardest_negative: bool = False,
        lr: float = 1e-3,
        tower_lr: float = 1e-5,
        tower_lr_decay: float = 1.0,
        weight_decay: float = 0.01,
        warmup: float = 0.05,
        min_lr_ratio: float = 0.0,
        eval_chunk_size: int = 1024,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        momentum: float = 0.9,
        adam_betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        image_cfg = tower_config(image_tower, ImageTowerConfig, "image_tower")
        text_cfg = tower_config(text_tower, TextTowerConfig, "text_tower")
        self._validate(embed_dim, criterion, temperature, temperature_bounds, margin, warmup)
        if optimizer not in ("adamw", "sgd"):
            raise ConfigurationError(f"optimizer={optimizer!r}; expected 'adamw' or 'sgd'")
        if not (isinstance(tower_lr_decay, int | float) and 0 < tower_lr_decay <= 1):
            raise ConfigurationError(
                f"tower_lr_decay={tower_lr_decay!r}; expected a factor in (0, 1] (1: no decay)"
            )
        if not 0 <= momentum < 1:
            raise ConfigurationError(f"momentum={momentum!r}; expected a value in [0, 1)")
        if len(adam_betas) != 2 or not all(0 <= b < 1 for b in adam_betas):
            raise ConfigurationError(
                f"adam_betas={list(adam_betas)}; expected two values in [0, 1)"
            )
        self.save_hyperparameters(ignore=["image_tower", "text_tower"])
        self.hparams["image_tower"] = asdict(image_cfg)
        self.hparams["text_tower"] = asdict(text_cfg)

        head = HeadSpec(projection, projection_hidden)
        head.check()
        self.image_tower = ImageTower(image_cfg, embed_dim, head)
        self.text_tower = TextTower(text_cfg, embed_dim, head)
        if tower_lr_decay != 1:  # a tower without blocks or layers to count refuses it now
            for tower in (self.image_tower, self.text_tower):
                tower.backbone_parameter_depths(decayed=True)
        self.criterion = criterion
        low, high = temperature_bounds
        self.log_scale_bounds = (math.log(1 / high), math.log(1 / low))
        # Max-margin never uses the temperature (only its statistics do): a parameter without a
        # gradient would stall DDP, so it is learnable for InfoNCE only.
        self.log_scale = nn.Parameter(
            torch.tensor(math.log(1 / temperature)),
            requires_grad=learn_temperature and criterion == "infonce",
        )
        self.controls = Controls()
        self.val_retrieval = RetrievalMetric(chunk_size=eval_chunk_size)
        self.test_retrieval = RetrievalMetric(chunk_size=eval_chunk_size)
        self._rng_to_restore: dict[str, Any] | None = None

    @staticmethod
    def _validate(
        embed_dim: int,
        criterion: str,
        temperature: float,
        bounds: tuple[float, float],
        margin: float,
        warmup: float,
    ) -> None:
        if not isinstance(embed_dim, int) or embed_dim < 1:
            raise ConfigurationError(f"embed_dim={embed_dim!r}; expected an integer >= 1")
        if criterion not in ("infonce", "max_margin"):
            raise ConfigurationError(f"criterion={criterion!r}; expected 'infonce' or 'max_margin'")
        low, high = bounds
        if not 0 < low <= high:
            raise ConfigurationError(
                f"temperature_bounds={tuple(bounds)}; expected 0 < lower <= upper"
            )
        if not low <= temperature <= high:
            raise ConfigurationError(
                f"temperature={temperature!r}; expected a value in "
                f"temperature_bounds [{low}, {high}]"
            )
        if margin < 0:
            raise ConfigurationError(f"margin={margin!r}; expected >= 0")
        if warmup < 0:
            raise ConfigurationError(f"warmup={warmup!r}; expected a fraction in [0, 1) or steps")

    # ----------------------------------------------------------------- encoding
    @property
    def temperature(self) -> Tensor:
        """The system's own temperature, clamped so it can neither vanish nor explode."""
        return self.log_scale.clamp(*self.log_scale_bounds).neg().exp()

    def image_transform(self, training: bool = False) -> Callable:
        """Preprocessing the data module applies to images, taken from the image tower's model."""
        return self.image_tower.transform(training)

    def encode_images(self, batch: dict) -> Tensor:
        if "image_features" in batch:
            return _unit_rows(self.image_tower.from_cached(batch["image_features"]))
        return _unit_rows(self.image_tower(batch["images"]))

    def encode_texts(self, batch: dict) -> Tensor:
        if "text_features" in batch:
            rows, mask = batch["text_features"], batch.get("text_features_mask")
            return _unit_rows(self.text_tower.from_cached(rows, mask))
        return _unit_rows(self.text_tower(batch["texts"]))

    # ----------------------------------------------------------------- training
    def contrastive_loss(
        self, image: Tensor, text: Tensor, batch: dict, controls: Controls
    ) -> StepLoss:
        """Loss of this rank's rows against the gathered batch, under the given controls.

        Always in float32, also under mixed precision: logits are similarities divided by
        temperatures down to 0.01, and bfloat16 (8 significant bits) would round a logit near 100
        to the nearest 0.5 and each scheduled temperature to 3 digits.
        """
        with torch.autocast(image.device.type, enabled=False):
            return self._contrastive_loss(image.float(), text.float(), batch, controls)

    def _contrastive_loss(
        self, image: Tensor, text: Tensor, batch: dict, controls: Controls
    ) -> StepLoss:
        image = scale_gradient(image, controls.tower_grad_scale[0])
        text = scale_gradient(text, controls.tower_grad_scale[1])
        all_image, offset = gather_with_grad(image)
        all_text, _ = gather_with_grad(text)
        targets = torch.arange(image.shape[0], device=image.device) + offset
        sim_i2t = image @ all_text.T
        sim_t2i = text @ all_image.T
        tau = self.temperature if controls.temperature is None else controls.temperature
        if self.criterion == "infonce":
            loss, row_i2t, row_t2i = info_nce(
                sim_i2t, sim_t2i, targets, tau, controls.direction_weights
            )
        else:
            margin = self.hparams.margin if controls.margin is None else controls.margin
            loss, row_i2t, row_t2i = max_margin(
                sim_i2t,
                sim_t2i,
                targets,
                margin,
                self.hparams.hardest_negative,
                controls.direction_weights,
            )
        parts = {"loss_i2t": row_i2t.mean().detach(), "loss_t2i": row_t2i.mean().detach()}
        loss = controls.loss_scale * loss
        if controls.temperature is not None and self.log_scale.requires_grad:
            # A schedule replaced the learnable temperature this step; keep the parameter in the
            # graph (with zero gradient) so DDP does not stall waiting for its gradient.
            loss = loss + 0.0 * self.log_scale
        auxiliaries: dict[str, Any] = {}
        if controls.extra_losses:
            view = StepEmbeddings(image, text, all_image, all_text, batch)
            for name, (weight, fn) in controls.extra_losses.items():
                term = fn(view)
                if isinstance(term, LossTerm):
                    auxiliaries[name] = term.auxiliaries
                    term = term.value
                parts[name] = term.detach()
                loss = loss + weight * term
        stats = step_statistics(sim_i2t, sim_t2i, targets, tau, row_i2t, row_t2i)
        return StepLoss(loss, parts, stats, auxiliaries)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        """The loss, and for the callbacks' ``on_train_batch_end``: the step's ``statistics``,
        the ``controls`` it used, and the ``auxiliaries`` of its extra losses by name."""
        controls, self.controls = self.controls, Controls()
        image = self.encode_images(batch)
        text = self.encode_texts(batch)
        loss, parts, stats, auxiliaries = self.contrastive_loss(image, text, batch, controls)
        self._check_finite(loss, batch, batch_idx, controls)
        size = image.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=size)
        self.log("train/temperature", stats.temperature.mean(), batch_size=size)
        return {
            "loss": loss,
            "statistics": stats,
            "controls": controls,
            "auxiliaries": auxiliaries,
        }

    def attached_trainer(self) -> L.Trainer | None:
        """The trainer running the module, or ``None`` when it runs without one (as in tests)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's answer for a module not attached to a trainer
            return None

    def _check_finite(self, loss: Tensor, batch: dict, batch_idx: int, controls: Controls) -> None:
        """Stop before a NaN or Inf reaches the weights; every rank stops if any rank must.

        The step raises before its backward pass, so the weights and the checkpoints written so
        far stay those of the last good step.
        """
        bad = not bool(torch.isfinite(loss.detach()))
        trainer = self.attached_trainer()
        if trainer is not None:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        ids = batch.get("image_id")
        shown = ids[:8].tolist() if isinstance(ids, Tensor) else []
        temperature = float(self.temperature.detach())
        in_force = controls_in_force(controls, self.criterion, temperature, self.hparams.margin)
        raise NonFiniteLossError(
            f"non-finite training loss ({float(loss.detach()):g} on this process) at epoch "
            f"{self.current_epoch}, global step {self.global_step}, batch {batch_idx} "
            f"(image ids {shown}{' ...' if len(shown) == 8 else ''}); controls in force: "
            f"{in_force}. Training stopped; {checkpoint_note(trainer)}"
        )

    # --------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict, metric: RetrievalMetric) -> dict[str, Tensor]:
        """Scores the batch into ``metric``; its embeddings, for callbacks that show them."""
        image = self.encode_images(batch)
        text = self.encode_texts(batch)
        metric.update(
            image,
            batch["image_id"],
            text,
            batch["text_id"],
            batch["text_image_id"],
            batch.get("image_bucket"),
            batch.get("text_bucket"),
        )
        return {"image_embeddings": image, "text_embeddings": text}

    def on_validation_epoch_start(self) -> None:
        self._share_normalisation_statistics()

    def _share_normalisation_statistics(self) -> None:
        """Process 0's running statistics everywhere before evaluating a model trained with DDP.

        Each process updates its BatchNorm statistics from its own slice of the batch; DDP copies
        process 0's at the start of the next training forward, so after an epoch's last step they
        still differ. Evaluation (and the checkpoint, written by process 0) then use one model.
        """
        if distributed_world()[1] == 1:
            return
        for module in self.modules():
            if isinstance(module, _NormBase) and module.track_running_stats:
                for buffer in module.buffers():
                    dist.broadcast(buffer, src=0)

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        """The batch's ``image_embeddings`` and ``text_embeddings`` (rows as in the batch), which
        ``on_validation_batch_end`` receives as ``outputs``: a view needs no second pass."""
        return self._evaluate(batch, self.val_retrieval)

    def on_validation_epoch_end(self) -> None:
        results = self.val_retrieval.compute()
        rsum = results.pop(RSUM)
        # The metric is already global; syncing identical values only silences Lightning's advice.
        self.log_dict({f"val/{k}": v for k, v in results.items()}, sync_dist=True)
        self.log(f"val/{RSUM}", rsum, prog_bar=True, sync_dist=True)
        self.val_retrieval.reset()

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, self.test_retrieval)

    def on_test_epoch_end(self) -> None:
        results = self.test_retrieval.compute()
        self.log_dict({f"test/{k}": v for k, v in results.items()}, sync_dist=True)
        self.test_retrieval.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        extra = {"text_cluster": batch["text_cluster"].cpu()} if "text_cluster" in batch else {}
        return {
            **extra,
            "image_embeddings": self.encode_images(batch).cpu(),
            "image_id": batch["image_id"].cpu(),
            "text_embeddings": self.encode_texts(batch).cpu(),
            "text_id": batch["text_id"].cpu(),
            "text_image_id": batch["text_image_id"].cpu(),
            "texts": list(batch["texts"]),
        }

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep every process's random generator states, so a resumed run draws the same; leave
        out frozen backbones that building the model loads again (see
        :mod:`~adaptalign.lightning_modules.frozen_backbones`)."""
        checkpoint["rng_states"] = rng.gather(self.trainer.world_size)
        frozen_backbones.leave_out(self._towers(), checkpoint)

    def _towers(self) -> dict[str, ImageTower | TextTower]:
        return {"image_tower": self.image_tower, "text_tower": self.text_tower}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put back the frozen backbones the checkpoint left out (checking they are the same);
        take this process's generator states for when training resumes.

        The states are set in ``on_train_start``, after everything that draws while a run is set up
        (building the towers, the sanity check, callbacks' setup), so the first resumed step
        draws exactly what the interrupted run's next step would have.
        """
        frozen_backbones.put_back(self._towers(), checkpoint)
        saved = checkpoint.get("rng_states")
        trainer = self.attached_trainer()
        if not saved or trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return
        self._rng_to_restore = rng.for_rank(saved, trainer.global_rank, trainer.world_size)
        if self._rng_to_restore is None:
            rank_zero_warn(
                f"the checkpoint holds random generator states of {len(saved)} processes, this "
                f"run has {trainer.world_size}; dropout and other draws will differ from the "
                "run it continues"
            )

    def on_train_start(self) -> None:
        states, self._rng_to_restore = self._rng_to_restore, None
        if states is not None:
            rng.restore(states)

    # -------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        depths = [
            pair
            for tower in (self.image_tower, self.text_tower)
            for pair in tower.backbone_parameter_depths(hp.tower_lr_decay != 1)
        ]
        heads = [
            *self.image_tower.projection.parameters(),
            *self.text_tower.projection.parameters(),
        ]
        if self.log_scale.requires_grad:
            heads.append(self.log_scale)
        sets = [*tower_sets(depths, hp.tower_lr, hp.tower_lr_decay), ("projections", heads, hp.lr)]
        groups = parameter_groups(sets, hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        betas = tuple(hp.adam_betas)
        return optimiser_with_schedule(
            groups, hp.optimizer, hp.momentum, total, hp.warmup, hp.min_lr_ratio, betas
        )
