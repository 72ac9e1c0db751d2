"""A selection split carved out of train, so the split a run is selected on is not the one reported.

Without it a run picks its best epoch on the val split and a comparison reports that same score:
an optimistic figure. Flickr8k as often distributed has train and dev only, so there is no third
split to report on. ``data.selection_images`` makes one: a seeded share of the train split becomes
the ``val`` split (what fit validates on, checkpoints select on, early stopping watches) and the
data set's own val split (dev) becomes ``test``, the report split, read once after fit.

The carve depends on ``split_seed`` and the set of training images only (never on ``seed``, the
method or ``train_images``), so every run of a comparison selects on the same images; low-data
subsets are then drawn, nested as ever, from the rest of train.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.records import Record

SETTING = "data.selection_images"
# Mixed into the seed, so the carve shares no random stream with the subsets (``data.seed``, often
# equal to ``split_seed``) or with the seeded val/test split of formats that have none.
STREAM = 0x5E1EC7


@dataclass(frozen=True)
class Selection:
    """What was carved, for the log line, the run summary and a comparison's header.

    ``report_images`` are the data set's own val (dev) images, now the ``test`` split.
    """

    selection_images: int
    report_images: int
    remaining_images: int
    split_seed: int

    def describe(self) -> str:
        """The one line a run logs when it sets up its splits."""
        return (
            f"selection split: {self.selection_images} images carved from train "
            f"(split_seed {self.split_seed}); report split: the {self.report_images} dev images "
            f"(the data set's own val split, evaluated once after fit); training draws from the "
            f"remaining {self.remaining_images}"
        )

    def as_dict(self) -> dict[str, Any]:
        """The facts a run's ``summary.json`` keeps under ``report.splits``."""
        return {
            "selected_on": "val",
            "selection_images": self.selection_images,
            "carved_from": "train",
            "split_seed": self.split_seed,
            "reported_on": "test",
            "report_images": self.report_images,
            "report_source": "dev",
            "remaining_train_images": self.remaining_images,
        }


def selection_size(size: int | float, available: int) -> int:
    """Images a ``selection_images`` setting asks for: a count, or a fraction of the train split.

    Some of train must remain to train on, so the whole split (a count of all of it, or the
    fraction 1) is refused. A whole number written as a float (``1000.0``) is a count, as for
    ``train_images``.
    """
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise ConfigurationError(f"{SETTING}={size!r}; expected a count or a fraction of train")
    if isinstance(size, float) and size > 1 and size.is_integer():
        size = int(size)
    if isinstance(size, float):
        if not 0 < size < 1:
            raise ConfigurationError(
                f"{SETTING}={size}; a fraction of the train split must lie in (0, 1), "
                "a count be an integer"
            )
        count = max(1, round(size * available))
    else:
        count = size
        if count < 1:
            raise ConfigurationError(f"{SETTING}={size}; expected a count >= 1")
    if count >= available:
        raise ConfigurationError(
            f"{SETTING}={size} asks for {count} images but the train split has {available}; "
            "expected fewer, so some remain to train on"
        )
    return count


def carve_selection(
    records: list[Record], size: int | float, split_seed: int, source: str = "the data set"
) -> tuple[list[Record], Selection]:
    """The records relabelled: ``size`` train images become ``val``, the old ``val`` ``test``.

    The images are chosen by a permutation drawn from ``split_seed`` over the train images sorted
    by path and id, so the choice depends on the set of images only, not on file order. Refused,
    naming the setting: a data set that already has a test split (it selects on val and reports on
    test without the option), and one whose val split, the report split to be, is empty.
    """
    counts = {name: sum(r.split == name for r in records) for name in ("train", "val", "test")}
    if counts["test"]:
        raise ConfigurationError(
            f"{SETTING}={size}: {source} already has a test split ({counts['test']} images), so "
            "runs select on val and report on test without the option; expected it unset "
            "(null), or a data set with train and val (dev) splits only (generated data: "
            "data.generated.num_test: 0; a seeded split: data.test_images: 0)"
        )
    if not counts["val"]:
        raise ConfigurationError(
            f"{SETTING}={size}: the val split of {source}, which would become the report split, "
            "has no images; expected a data set with a val (dev) split to report on"
        )
    count = selection_size(size, counts["train"])
    train = [i for i, r in enumerate(records) if r.split == "train"]
    train.sort(key=lambda i: (str(records[i].image_path), records[i].image_id))
    order = np.random.default_rng([STREAM, split_seed]).permutation(len(train))
    chosen = {train[i] for i in order[:count].tolist()}
    relabelled = [
        replace(r, split="val")
        if i in chosen
        else replace(r, split="test")
        if r.split == "val"
        else r
        for i, r in enumerate(records)
    ]
    selection = Selection(count, counts["val"], counts["train"] - count, split_seed)
    return relabelled, selection
