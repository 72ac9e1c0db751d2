"""Variance-aware loss weighting: weigh the contrastive loss by how uncertain the model still is.

After every training step the callback reduces one uncertainty signal per direction ``d`` (index
0: image->text, 1: text->image) over all ranks' rows and smooths it with an exponential moving
average (the first observation initialises it)::

    s_d <- momentum * s_d + (1 - momentum) * x_d

The signal ``x_d`` is, from the step's :class:`StepStatistics`:

* ``variance``: the variance over rows of the softmax probability given to the true match;
* ``entropy``: the mean row entropy of the softmax over candidates;
* ``spread``: the standard deviation of the rows' cosine similarities.

Before the next step it writes, in ``directions`` mode, one weight per direction::

    w_d = clip((2 * s_d + eps) / (s_i2t + s_t2i + eps), w_min, w_max)

so the more uncertain direction gets more weight and, before clipping, the pair sums to exactly 2
(the plain symmetric loss has weights (1, 1)); ``eps`` in both places keeps that sum and gives
(1, 1) when both signals are 0. In ``global`` mode it writes one scale on the whole loss::

    w = clip((s_mean + eps) / (ref + eps), w_min, w_max),   s_mean = (s_i2t + s_t2i) / 2

with ``ref`` the ``reference`` setting, or else the first smoothed value observed. Scaling by the
signal relative to where training started keeps the scale at 1 at the start (the run begins as the
plain loss would) and raises it when uncertainty grows above that level, lowering it as the model
becomes confident, so the loss's step size follows the uncertainty. The first step, before any
observation, uses weights (1, 1) and scale 1. ``fixed`` always writes ``fixed_weights``, the
baseline, while still smoothing and logging every signal so its runs compare with the others.

This is the project's own reading of variance-aware loss scheduling: the original paper's exact
formula is not public.

Reduction across ranks is exact where the statistics allow it (see :func:`reduce_signals`): every
rank all-reduces the same sums, so every rank computes the same weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from adaptalign.callbacks.log_steps import still_writes, writes_logs
from adaptalign.common.errors import ConfigurationError
from adaptalign.lightning_modules.controls import ControlledSystem, Scalar, StepStatistics
from adaptalign.lightning_modules.gather import all_reduce_sum

SIGNALS = ("fixed", "variance", "entropy", "spread")
MEASURES = ("variance", "entropy", "spread")
MODES = ("directions", "global")
DIRECTIONS = ("i2t", "t2i")


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 sums keep ``E[p^2] - E[p]^2`` accurate; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def sufficient_sums(stats: StepStatistics) -> Tensor:
    """This rank's additive sums, shape (5, 2) with one column per direction.

    Rows: row count ``n``; ``sum p`` and ``sum p^2`` of the true match's probability (recovered
    from ``n``, its mean and its population variance); the sum of row entropies; and
    ``n * std^2`` of the similarities. Summing these over ranks is what makes the reduction exact.
    """
    device = stats.positive_prob_mean.device
    dtype = _sum_dtype(device)
    n = stats.num_rows
    if n == 0:  # a rank without rows adds nothing (its means are NaN)
        return torch.zeros(5, 2, dtype=dtype, device=device)
    mean = stats.positive_prob_mean.to(dtype)
    var = stats.positive_prob_var.to(dtype)
    return n * torch.stack(
        [
            torch.ones_like(mean),
            mean,
            var + mean.square(),
            stats.entropy.to(dtype),
            stats.similarity_std.to(dtype).square(),
        ]
    )


def signals_from_sums(sums: Tensor) -> Tensor:
    """The three signals, shape (3, 2), rows in :data:`MEASURES` order, from (summed) sums.

    The variance is the population variance over all rows (``step_statistics`` computes each
    rank's with ``unbiased=False``, so this equals its value on the concatenated rows); the entropy
    is the row-count-weighted mean. The statistics carry the similarities' std but not their mean,
    so the spread is ``sqrt`` of the row-count-weighted mean of the ranks' variances: exact when
    the ranks' mean similarities agree, otherwise short of the between-rank term (every rank's rows
    span the same gathered columns, so rows weigh entries equally).
    """
    n = sums[0].clamp_min(1)
    mean = sums[1] / n
    variance = (sums[2] / n - mean.square()).clamp_min(0)
    entropy = sums[3] / n
    spread = (sums[4] / n).clamp_min(0).sqrt()
    return torch.stack([variance, entropy, spread])


def reduce_signals(stats: StepStatistics) -> Tensor:
    """The signals of all ranks' rows; every rank gets the same values. Shape (3, 2)."""
    return signals_from_sums(all_reduce_sum(sufficient_sums(stats)))


class LossWeighting(L.Callback):
    """Weights the two directions (or scales the whole loss) by a smoothed uncertainty signal.

    Args:
        signal: ``variance``, ``entropy`` or ``spread`` drive the weights; ``fixed`` is the
            baseline that always writes ``fixed_weights``.
        mode: ``directions`` writes ``direction_weights``; ``global`` writes ``loss_scale``.
        momentum: EMA momentum in [0, 1); 0 uses each step's signal as is.
        w_min, w_max: clip range of every weight, ``0 < w_min <= 1 <= w_max``.
        fixed_weights: the (image->text, text->image) weights of ``signal="fixed"``.
        reference: the signal level at which the global scale is 1; default the first observed.
        eps: keeps the ratios finite when the signals are 0.

    Weights are multiplied into what other callbacks wrote this step, so they compose. Logged on
    the steps Lightning writes: ``loss_weight/w_i2t``, ``loss_weight/w_t2i`` (or
    ``loss_weight/scale`` in global mode), the driving signal's EMA as ``loss_weight/signal_i2t``
    and ``loss_weight/signal_t2i``, and every signal's EMA by name (``loss_weight/variance_i2t``,
    ``loss_weight/entropy_t2i``, ...) in every run, the fixed baseline included, so runs compare.
    """

    def __init__(
        self,
        signal: Literal["fixed", "variance", "entropy", "spread"] = "variance",
        mode: Literal["directions", "global"] = "directions",
        momentum: float = 0.9,
        w_min: float = 0.5,
        w_max: float = 1.5,
        fixed_weights: tuple[float, float] = (1.0, 1.0),
        reference: float | None = None,
        eps: float = 1e-8,
    ) -> None:
        if signal not in SIGNALS:
            raise ConfigurationError(f"signal={signal!r}; expected one of {SIGNALS}")
        if mode not in MODES:
            raise ConfigurationError(f"mode={mode!r}; expected one of {MODES}")
        if not 0 <= momentum < 1:
            raise ConfigurationError(f"momentum={momentum}; expected 0 <= momentum < 1")
        if not 0 < w_min <= 1 <= w_max:
            raise ConfigurationError(
                f"w_min={w_min}, w_max={w_max}; expected 0 < w_min <= 1 <= w_max"
            )
        fixed = tuple(float(w) for w in fixed_weights)
        if len(fixed) != 2 or not all(w > 0 for w in fixed):
            raise ConfigurationError(
                f"fixed_weights={tuple(fixed_weights)}; expected two positive weights "
                "(image->text, text->image)"
            )
        if reference is not None:
            if mode != "global":
                raise ConfigurationError(
                    f"reference={reference} is used by mode='global' only; got mode={mode!r}"
                )
            if not reference > 0:
                raise ConfigurationError(f"reference={reference}; expected > 0 (or None)")
        if not eps > 0:
            raise ConfigurationError(f"eps={eps}; expected > 0")
        if signal == "spread" and mode == "directions":
            # Measured on Flickr8k: the weights stayed exactly (1, 1) for a whole run.
            rank_zero_warn(
                "signal='spread' with mode='directions' keeps the weights at (1, 1): a batch's "
                "image->text and text->image similarity matrices are transposes of each other, so "
                "their spreads are equal; use mode='global'"
            )
        self.signal = signal
        self.mode = mode
        self.momentum = float(momentum)
        self.w_min = float(w_min)
        self.w_max = float(w_max)
        self.fixed_weights: tuple[float, float] = fixed  # type: ignore[assignment]
        self.reference = None if reference is None else float(reference)
        self.eps = float(eps)
        self.ema: Tensor | None = None  # (3, 2): MEASURES x DIRECTIONS
        self.observed_reference: Tensor | None = None
        self.steps = 0
        self._log_batch = True  # whether Lightning writes the current batch's logs

    @property
    def state_key(self) -> str:
        return self._generate_state_key(signal=self.signal, mode=self.mode)

    # ------------------------------------------------------------------ formulas
    def observe(self, signals: Tensor) -> None:
        """Fold one step's reduced signals, shape (3, 2), into the moving average."""
        signals = signals.detach()
        if self.ema is None:
            self.ema = signals.clone()
        else:
            ema = self.ema.to(device=signals.device, dtype=signals.dtype)  # e.g. after resume
            self.ema = self.momentum * ema + (1 - self.momentum) * signals
        if self.observed_reference is not None:
            self.observed_reference = self.observed_reference.to(self.ema.device)
        self.steps += 1
        if self.observed_reference is None and self.signal != "fixed":
            self.observed_reference = self.ema[MEASURES.index(self.signal)].mean().clone()

    def direction_weights(self) -> tuple[Scalar, Scalar]:
        """(image->text, text->image) weights for the next step."""
        if self.signal == "fixed":
            return self.fixed_weights
        if self.ema is None or self.mode == "global":
            return (1.0, 1.0)
        s = self.ema[MEASURES.index(self.signal)]
        w = ((2 * s + self.eps) / (s.sum() + self.eps)).clamp(self.w_min, self.w_max)
        return (w[0], w[1])

    def loss_scale(self) -> Scalar:
        """The scale on the whole contrastive loss for the next step (1 unless mode global)."""
        if self.signal == "fixed" or self.mode != "global" or self.ema is None:
            return 1.0
        s_mean = self.ema[MEASURES.index(self.signal)].mean()
        ref = self.reference if self.reference is not None else self.observed_reference
        return ((s_mean + self.eps) / (ref + self.eps)).clamp(self.w_min, self.w_max)

    # --------------------------------------------------------------------- hooks
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: ControlledSystem, batch: object, batch_idx: int
    ) -> None:
        controls = pl_module.controls
        dtype = torch.float32  # the loss's dtype; float64 weights would promote it
        log = self._log_batch = writes_logs(trainer)
        if self.mode == "global" and self.signal != "fixed":
            scale = _as(self.loss_scale(), pl_module.device, dtype)
            controls.loss_scale = controls.loss_scale * scale
            if log:
                pl_module.log("loss_weight/scale", scale, on_step=True, on_epoch=False)
            return
        w = tuple(_as(v, pl_module.device, dtype) for v in self.direction_weights())
        old = controls.direction_weights
        controls.direction_weights = (old[0] * w[0], old[1] * w[1])
        if log:
            for name, value in zip(DIRECTIONS, w, strict=True):
                pl_module.log(f"loss_weight/w_{name}", value, on_step=True, on_epoch=False)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: ControlledSystem,
        outputs: object,
        batch: object,
        batch_idx: int,
    ) -> None:
        if outputs is None:  # a skipped step has nothing to observe
            return
        stats = outputs.get("statistics") if isinstance(outputs, Mapping) else None
        if not isinstance(stats, StepStatistics):
            raise ConfigurationError(
                "LossWeighting needs the step's statistics: training_step must return "
                "{'loss': ..., 'statistics': StepStatistics} as AlignmentModule does"
            )
        self.observe(reduce_signals(stats))
        ema = self.ema
        if ema is None or not still_writes(trainer, self._log_batch):
            return
        for m, measure in enumerate(MEASURES):
            for d, name in enumerate(DIRECTIONS):
                pl_module.log(f"loss_weight/{measure}_{name}", ema[m, d], on_step=True)
        if self.signal != "fixed":
            row = ema[MEASURES.index(self.signal)]
            for d, name in enumerate(DIRECTIONS):
                pl_module.log(f"loss_weight/signal_{name}", row[d], on_step=True)

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {
            "ema": cpu(self.ema),
            "observed_reference": cpu(self.observed_reference),
            "steps": self.steps,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.ema = state_dict["ema"]
        self.observed_reference = state_dict["observed_reference"]
        self.steps = int(state_dict["steps"])


def _as(value: Scalar, device: torch.device, dtype: torch.dtype) -> Scalar:
    """Tensors moved to the module's device and dtype; plain floats stay floats."""
    return value.to(device=device, dtype=dtype) if isinstance(value, Tensor) else value
