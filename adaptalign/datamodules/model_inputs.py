"""What the data side takes from the system it feeds, described here so it never imports the system.

The image tower's preprocessing decides input size and normalisation, so data and model never
disagree about them; a frozen tower's features can be served from the feature cache instead of
raw inputs. A callback that sees both sides (``adaptalign.callbacks.model_inputs.ModelInputsLink``)
hands them to the data module when a trainer sets up, before any loader is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from adaptalign.datamodules.datasets import Transform

# What a data module under a trainer says when nothing handed it the system's inputs.
MISSING_LINK = (
    "the data module takes the system's image preprocessing and frozen towers from a callback; "
    "add adaptalign.callbacks.model_inputs.ModelInputsLink() to the Trainer's callbacks (the "
    "adaptalign command line adds it)"
)


class FeatureTower(Protocol):
    """The frozen part of an image tower as the feature cache uses it: the whole backbone of a
    frozen tower, or the frozen prefix of one whose top blocks train."""

    @property
    def cut(self) -> str:
        """Empty for a whole frozen backbone; else the block its trained top starts at."""
        ...

    @property
    def cached_shape(self) -> tuple[int, ...]:
        """The shape of one image's cached row: ``(D,)`` features or a ``(C, H, W)`` map."""
        ...

    def frozen_state(self) -> dict[str, Tensor]:
        """The weights and buffers the cached rows depend on (part of their key)."""
        ...

    def frozen_features(self, images: Tensor) -> Tensor:
        """The frozen part's output for a batch of preprocessed images."""
        ...


class TextPrefix(Protocol):
    """The frozen prefix of a text tower whose top layers train, as the feature cache uses it."""

    model: nn.Module  # the sentence-transformers model: its tokenizer and token budget

    @property
    def cut(self) -> str:
        """Where the trained top starts, e.g. ``layer 5 of 6``."""
        ...

    @property
    def hidden_size(self) -> int: ...

    def frozen_state(self) -> dict[str, Tensor]:
        """The weights and buffers the cached hidden states depend on (part of their key)."""
        ...

    def frozen_hidden(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Hidden states ``(B, T, H)`` entering the first trained layer, and the attention mask
        ``(B, T)``, of raw captions."""
        ...


@dataclass(frozen=True)
class ModelInputs:
    """The system's side of the data: its preprocessing, and the towers whose features are cached.

    Args:
        transform: the image tower's evaluation preprocessing, which training data uses too.
        image_tower: the image tower's frozen part (whole or prefix), else ``None``.
        text_backbone: the text tower's sentence-transformers model when it is frozen, else
            ``None``.
        text_prefix: the text tower's frozen prefix when its top layers train, else ``None``.
        train_transform: the training images' preprocessing when it augments them, else ``None``
            (training uses ``transform``); augmented images are never served from the cache.
    """

    transform: Transform
    image_tower: FeatureTower | None = None
    text_backbone: nn.Module | None = None
    text_prefix: TextPrefix | None = None
    train_transform: Transform | None = None
