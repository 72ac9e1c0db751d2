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
    """A frozen image tower as the feature cache uses it."""

    backbone: nn.Module  # its weights and layout are part of the cached rows' key

    def features(self, images: Tensor) -> Tensor:
        """Backbone features ``(B, D)`` of a batch of preprocessed images."""
        ...


@dataclass(frozen=True)
class ModelInputs:
    """The system's side of the data: its preprocessing, and the towers whose features are cached.

    Args:
        transform: the image tower's evaluation preprocessing, which training data uses too.
        image_tower: the image tower when it is frozen, else ``None``.
        text_backbone: the text tower's sentence-transformers model when it is frozen, else
            ``None``.
    """

    transform: Transform
    image_tower: FeatureTower | None = None
    text_backbone: nn.Module | None = None
