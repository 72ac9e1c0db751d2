"""MM-TS: a cosine temperature (or margin) schedule with per-sample shifts from cluster sizes.

Every training step the callback writes one temperature per sample into the system's controls:

    tau_i(t) = (alpha / 2) * cos(2 * pi * t / P) + shift(n_i),   P = total_steps / K
    shift(n) = s_min + (n - n_min) / (n_max - n_min) * (s_max - s_min)

where ``t`` is the optimiser step, ``K`` the number of oscillations and ``n_i`` the size of the
caption cluster of sample ``i`` (a larger cluster, a more common concept, gets a higher
temperature). When every cluster has the same size (``n_max = n_min``) the fraction is 0 / 0;
every sample then gets ``s_min``, as a cluster of size ``n_min`` would. With
``cluster_shift=False`` every sample gets the mid shift and the schedule is the uni-modal one of
Kukleva et al., ``tau(t) = t_min + (t_max - t_min) * (1 + cos(2 pi t / P)) / 2``; see
:class:`CosineTemperatureSchedule`. With ``target="margin"`` the same values become the
per-sample margins of the max-margin criterion.

The value depends only on the global step, which Lightning restores on resume, so a resumed run
continues the schedule exactly.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from adaptalign.callbacks.log_steps import writes_logs
from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.clusters import tercile_bounds
from adaptalign.lightning_modules.controls import ControlledSystem


class TemperatureSchedule(L.Callback):
    """Per-sample temperatures (or margins) from a cosine base schedule plus cluster-size shifts.

    Args:
        alpha: peak-to-peak amplitude of the cosine base (it swings between +-alpha/2).
        oscillations: K, the number of full cosine periods over training.
        shift_min, shift_max: the shift of the smallest and of the largest cluster.
        cluster_shift: read ``cluster_size`` from the batch; off, every sample gets the mid shift.
        target: ``temperature`` (InfoNCE) or ``margin`` (max-margin).
        total_steps: schedule length; default the trainer's estimated optimiser steps.
        histogram_every: steps between TensorBoard histograms of the per-sample values.
    """

    def __init__(
        self,
        alpha: float = 0.08,
        oscillations: int = 5,
        shift_min: float = 0.05,
        shift_max: float = 0.20,
        cluster_shift: bool = True,
        target: Literal["temperature", "margin"] = "temperature",
        total_steps: int | None = None,
        histogram_every: int = 50,
    ) -> None:
        if alpha < 0:
            raise ConfigurationError(f"alpha={alpha}; expected >= 0")
        if oscillations < 1:
            raise ConfigurationError(f"oscillations={oscillations}; expected >= 1")
        if shift_max < shift_min:
            raise ConfigurationError(
                f"shift_max={shift_max} < shift_min={shift_min}; expected shift_min <= shift_max"
            )
        if target == "temperature" and not alpha / 2 < shift_min:
            raise ConfigurationError(
                f"alpha/2={alpha / 2:g} must be < shift_min={shift_min:g}, or the temperature "
                "could reach 0 or below"
            )
        if target == "margin" and alpha / 2 > shift_min:
            raise ConfigurationError(
                f"alpha/2={alpha / 2:g} > shift_min={shift_min:g}: the margin could turn negative"
            )
        if target not in ("temperature", "margin"):
            raise ConfigurationError(f"target={target!r}; expected 'temperature' or 'margin'")
        self.alpha = alpha
        self.oscillations = oscillations
        self.shift_min = shift_min
        self.shift_max = shift_max
        self.cluster_shift = cluster_shift
        self.target = target
        self.total_steps = total_steps
        self.histogram_every = histogram_every
        self.size_range: tuple[int, int] | None = None
        self.bucket_bounds: tuple[int, int] | None = None

    # ------------------------------------------------------------------ formulas
    def base(self, step: int) -> float:
        period = self.total_steps / self.oscillations  # type: ignore[operator]
        return self.alpha / 2 * math.cos(2 * math.pi * step / period)

    def shift(self, sizes: Tensor) -> Tensor:
        """``shift(n)`` per sample.

        With equal cluster sizes there is no long tail to rank and the formula's fraction is
        0 / 0: every sample gets ``s_min``, what the smallest cluster gets whenever sizes differ.
        """
        if not self.cluster_shift:
            return torch.full(sizes.shape, (self.shift_min + self.shift_max) / 2)
        if self.size_range is None:
            raise ConfigurationError(
                "cluster_shift needs the data's cluster sizes: enable clustering in the data "
                "module (data.clusters) or set cluster_shift: false"
            )
        low, high = self.size_range
        if high == low:
            return torch.full(sizes.shape, self.shift_min, dtype=torch.float)
        fraction = (sizes.float() - low) / (high - low)
        return self.shift_min + fraction * (self.shift_max - self.shift_min)

    def values(self, step: int, sizes: Tensor) -> Tensor:
        """One temperature (or margin) per sample at optimiser step ``step``."""
        return self.base(step) + self.shift(sizes)

    # --------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.total_steps is None:
            self.total_steps = max(1, int(trainer.estimated_stepping_batches))
        if self.cluster_shift:
            sizes = getattr(trainer.datamodule, "cluster_sizes", None)
            if sizes is not None and len(sizes) > 0:
                self.size_range = (int(min(sizes)), int(max(sizes)))
                self.bucket_bounds = tercile_bounds(sizes)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: ControlledSystem, batch: dict, batch_idx: int
    ) -> None:
        rows = len(batch["texts"]) if "texts" in batch else int(batch["image_id"].shape[0])
        if self.cluster_shift:
            if "cluster_size" not in batch:
                raise ConfigurationError(
                    "the batch has no 'cluster_size': enable clustering in the data module"
                )
            sizes = batch["cluster_size"].cpu()
        else:
            sizes = torch.zeros(rows)
        step = trainer.global_step
        values = self.values(step, sizes).to(pl_module.device)
        if getattr(pl_module.controls, self.target) is not None:
            raise ConfigurationError(
                f"two callbacks set the {self.target} of the same step; keep one schedule"
            )
        setattr(pl_module.controls, self.target, values)
        if writes_logs(trainer):
            pl_module.log(f"schedule/base_{self.target}", self.base(step), on_step=True)
            self._per_bucket(pl_module, sizes, values)
        self._histogram(trainer, values, step)

    def _per_bucket(self, pl_module: ControlledSystem, sizes: Tensor, values: Tensor) -> None:
        """Mean value for samples of tail, middle and head clusters (cluster-size terciles)."""
        if self.bucket_bounds is None:
            return
        tail_max, middle_max = self.bucket_bounds
        buckets = {
            "tail": sizes <= tail_max,
            "middle": (sizes > tail_max) & (sizes <= middle_max),
            "head": sizes > middle_max,
        }
        for name, mask in buckets.items():
            if bool(mask.any()):
                mean = values[mask.to(values.device)].mean()
                pl_module.log(f"schedule/{self.target}_{name}", mean, on_step=True)

    def _histogram(self, trainer: L.Trainer, values: Tensor, step: int) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if self.histogram_every > 0 and step % self.histogram_every == 0:
            add = getattr(experiment, "add_histogram", None)
            if callable(add):
                add(f"schedule/{self.target}_per_sample", values.detach().cpu(), step)

    def state_dict(self) -> dict:
        return {
            "total_steps": self.total_steps,
            "size_range": self.size_range,
            "bucket_bounds": self.bucket_bounds,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.total_steps = state_dict["total_steps"]
        self.size_range = state_dict["size_range"]
        self.bucket_bounds = state_dict.get("bucket_bounds")


class CosineTemperatureSchedule(TemperatureSchedule):
    """The uni-modal schedule: between ``t_min`` and ``t_max``, the same for every sample."""

    def __init__(
        self,
        t_min: float = 0.1,
        t_max: float = 1.0,
        oscillations: int = 5,
        total_steps: int | None = None,
        histogram_every: int = 50,
    ) -> None:
        if not 0 < t_min <= t_max:
            raise ConfigurationError(f"t_min={t_min}, t_max={t_max}; expected 0 < t_min <= t_max")
        middle = (t_min + t_max) / 2
        # alpha/2 < middle holds for any t_min > 0, so the base check cannot refuse it.
        super().__init__(
            alpha=t_max - t_min,
            oscillations=oscillations,
            shift_min=middle,
            shift_max=middle,
            cluster_shift=False,
            total_steps=total_steps,
            histogram_every=histogram_every,
        )
