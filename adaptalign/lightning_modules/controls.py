"""The contract between the system and the adaptive callbacks: controls in, statistics out.

Callbacks never reach into the system's private state, nor the system into theirs. Before a
training step they write a :class:`Controls`; the step consumes it (and the system starts the next
step from a fresh one), and returns, in the dict ``training_step`` gives Lightning, the detached
:class:`StepStatistics` and what each extra loss reported (:class:`LossTerm`), for the callbacks to
read in ``on_train_batch_end(outputs=...)``. :class:`ControlledSystem` lists all a callback may
touch on the system.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from adaptalign.common.errors import ConfigurationError

Scalar = float | Tensor


@dataclass
class StepEmbeddings:
    """What an auxiliary loss may see: this rank's embeddings and batch, plus the gathered ones."""

    image: Tensor
    text: Tensor
    all_image: Tensor
    all_text: Tensor
    batch: dict


@dataclass
class LossTerm:
    """An extra loss's value (in the graph) and what its callback reads after the step.

    ``auxiliaries`` should be detached: the step returns it as it is, under
    ``outputs["auxiliaries"][name]``, and the graph is freed only once the callbacks are done.
    """

    value: Tensor
    auxiliaries: Any = None


AuxiliaryLoss = Callable[[StepEmbeddings], Tensor | LossTerm]


@dataclass
class Controls:
    """Per-step settings written by callbacks; ``None`` means "use the system's own".

    Callbacks compose in any order: ``direction_weights``, ``loss_scale`` and ``tower_grad_scale``
    are multiplied into what is already there, ``temperature`` and ``margin`` have at most one
    writer per step, and ``extra_losses`` names are distinct (both enforced by the writers).

    ``temperature`` and ``margin`` are a scalar or one value per sample of this rank's batch (the
    rows this rank computes). ``direction_weights`` weigh the image->text and text->image terms;
    ``loss_scale`` multiplies the whole contrastive loss. ``tower_grad_scale`` multiplies the
    gradient reaching each tower's embedding (identity in the forward pass). ``extra_losses`` maps a
    name to ``(weight, fn)``; ``fn`` receives the step's embeddings and returns a scalar, or a
    :class:`LossTerm` whose auxiliaries the step hands back under the same name. ``fn`` should only
    read: it runs inside the step, and whatever it learns goes back through the step's outputs.
    """

    temperature: Scalar | None = None
    margin: Scalar | None = None
    direction_weights: tuple[Scalar, Scalar] = (1.0, 1.0)
    loss_scale: Scalar = 1.0
    tower_grad_scale: tuple[Scalar, Scalar] = (1.0, 1.0)
    extra_losses: dict[str, tuple[Scalar, AuxiliaryLoss]] = field(default_factory=dict)

    def add_extra_loss(self, name: str, weight: Scalar, fn: AuxiliaryLoss) -> None:
        """Register an auxiliary term; two callbacks claiming one name is a configuration error."""
        if name in self.extra_losses:
            raise ConfigurationError(f"two callbacks add the extra loss {name!r} to one step")
        self.extra_losses[name] = (weight, fn)

    def describe(self) -> dict[str, object]:
        """A printable summary, for error messages and logs (tensors summarised, not dumped)."""

        def short(value: object) -> object:
            if isinstance(value, Tensor):
                if value.numel() == 1:
                    return float(value)
                return f"tensor{tuple(value.shape)} min={value.min():.4g} max={value.max():.4g}"
            if isinstance(value, tuple):
                return tuple(short(v) for v in value)
            return value

        return {
            "temperature": short(self.temperature),
            "margin": short(self.margin),
            "direction_weights": short(self.direction_weights),
            "loss_scale": short(self.loss_scale),
            "tower_grad_scale": short(self.tower_grad_scale),
            "extra_losses": {k: short(w) for k, (w, _) in self.extra_losses.items()},
        }


@dataclass
class StepStatistics:
    """Detached statistics of one training step, computed over this rank's rows.

    Per direction (index 0: image->text, 1: text->image): mean row entropy of the softmax over
    candidates, mean and variance of the probability given to the true match; the standard deviation
    of all cosine similarities of the rows; and the per-row losses. Callbacks reduce them across
    ranks themselves (``all_reduce`` of sufficient statistics) so every rank sees the same value.
    """

    entropy: Tensor
    positive_prob_mean: Tensor
    positive_prob_var: Tensor
    similarity_std: Tensor
    row_losses_i2t: Tensor
    row_losses_t2i: Tensor
    temperature: Tensor

    @property
    def num_rows(self) -> int:
        return int(self.row_losses_i2t.shape[0])


@runtime_checkable
class ControlledSystem(Protocol):
    """What a callback may touch on the system: the next step's controls, the device, logging.

    Also the criterion's name, as statistics mean different things under each. Anything else a
    callback needs comes from the step's outputs or the trainer.
    """

    controls: Controls
    criterion: str

    @property
    def device(self) -> torch.device: ...

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None: ...


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def scale_gradient(x: Tensor, scale: Scalar) -> Tensor:
    """Scale the gradient flowing into ``x`` without changing its value (no-op when 1)."""
    if not isinstance(scale, Tensor) and scale == 1.0:
        return x
    scale_t = torch.as_tensor(scale, dtype=x.dtype, device=x.device).detach()
    return _ScaleGradient.apply(x, scale_t)
