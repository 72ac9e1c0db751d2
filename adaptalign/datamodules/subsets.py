"""Low-data training subsets: seeded, nested, and with an optional cap on captions per image.

Subsets are prefixes of one seeded permutation of the training images, so for a given seed the
1,000-image subset lies inside the 2,000-image one and results across sizes differ only by data
added, never by data swapped.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.records import Record


def subset_size(size: int | float | None, available: int) -> int:
    """Number of images a ``train_images`` setting asks for: a count, or a fraction in (0, 1].

    A whole number above 1 written as a float (``1000.0``) is a count: a YAML file may write it
    so, and a process that created ``typing.Union[float, int]`` earlier (Ray Tune does) makes the
    command-line parser read ``1000`` as a float too.
    """
    if size is None:
        return available
    if isinstance(size, bool):
        raise ConfigurationError(f"data.train_images={size!r}; expected a count or a fraction")
    if isinstance(size, float) and size > 1 and size.is_integer():
        size = int(size)
    if isinstance(size, float):
        if not 0 < size <= 1:
            raise ConfigurationError(
                f"data.train_images={size}; a fraction must lie in (0, 1], a count be an integer"
            )
        return max(1, round(size * available))
    count = int(size)
    if count < 1:
        raise ConfigurationError(f"data.train_images={size}; expected a count >= 1")
    if count > available:
        raise ConfigurationError(
            f"data.train_images={count} but the train split has only {available} images"
        )
    return count


def nested_subset(records: list[Record], size: int | float | None, seed: int) -> list[Record]:
    """The first ``size`` images of a permutation drawn from ``seed`` (all of them for ``None``)."""
    count = subset_size(size, len(records))
    if count == len(records):
        return list(records)
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in sorted(order[:count].tolist())]


def cap_captions(records: list[Record], per_image: int | None) -> list[Record]:
    """Keep at most ``per_image`` captions of each image (the first ones, in file order)."""
    if per_image is None:
        return list(records)
    if per_image < 1:
        raise ConfigurationError(f"data.captions_per_image={per_image}; expected >= 1")
    return [replace(r, captions=r.captions[:per_image]) for r in records]
