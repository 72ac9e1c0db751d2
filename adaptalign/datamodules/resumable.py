"""A training DataLoader that continues an interrupted epoch at the batch where it stopped.

Lightning restores weights, optimiser, callbacks and loop counters from a checkpoint saved in the
middle of an epoch, but a plain DataLoader starts that epoch's data again from its first batch
while the step counter carries on, so a resumed run trains on other batches than the run it
continues. :class:`ResumableDataLoader` counts the batches it has yielded in the current epoch and
reports ``{"epoch", "batches"}`` as its state; restored from that state, its next iteration of the
*same* epoch leaves out exactly the batches already trained on. It leaves them out at the level of
the (batch) sampler's indices, so a skipped sample is never loaded or decoded; the sampler still
plans the whole epoch, which keeps seeded orders (and curriculum plans) identical.

The skipping happens in a second, plain DataLoader over the same dataset, built once from the same
arguments, whose batch sampler (or sampler) is the given one minus the skipped batches; it runs the
iterations and keeps any persistent workers. The loader itself keeps its ``sampler`` and
``batch_sampler`` as given, for Lightning's ``set_epoch`` and for callbacks that look for them.

An iteration only starts the underlying DataLoader iterator, and so reads the epoch and draws from
the sampler, when its first batch is asked for. Lightning creates the training iterator before a
(resumed) epoch's sampler epoch is set, and a loader with workers would otherwise draw its first
batches with the previous settings at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

from torch.utils.data import DataLoader, Dataset, IterableDataset

from adaptalign.common.checks import is_int
from adaptalign.common.errors import ConfigurationError

# DataLoader arguments that decide which indices are drawn, in which batches.
ORDER_ARGUMENTS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


def _is_count(value: object) -> bool:
    return is_int(value) and value >= 0  # type: ignore[operator]


class EpochPosition:
    """Where a training loader is within its epoch: what both training loaders checkpoint.

    The state is ``{"epoch", "batches"}``: the epoch of the latest iteration and how many of its
    batches were yielded. Restored, it says how many batches the next iteration leaves out, if
    that iteration belongs to the same epoch (:meth:`batches_to_skip`); a state applies to one
    iteration only.
    """

    _epoch: int | None = None  # epoch of the latest iteration
    _batches: int = 0  # batches of that epoch yielded (left-out ones included)
    _restored: tuple[int, int] | None = None  # a loaded state not yet applied

    def state_dict(self) -> dict[str, int | None]:
        """The epoch of the latest iteration and how many of its batches were yielded."""
        if self._restored is not None:  # saved again before the restored epoch went on
            epoch, batches = self._restored
            return {"epoch": epoch, "batches": batches}
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Leave out ``batches`` batches in the next iteration, if it belongs to ``epoch``."""
        epoch, batches = state_dict.get("epoch"), state_dict.get("batches")
        if not (epoch is None or _is_count(epoch)) or not _is_count(batches):
            raise ConfigurationError(
                f"the checkpoint's training loader state {state_dict!r}; expected 'epoch' (an "
                "integer >= 0 or null) and 'batches' (an integer >= 0)"
            )
        self._restored = None if epoch is None else (int(epoch), int(batches))

    def batches_to_skip(self, epoch: int, total: int) -> int:
        """How many of ``epoch``'s ``total`` batches the iteration starting now leaves out; it
        becomes the loader's position."""
        skip = 0
        if self._restored is not None:
            restored_epoch, batches = self._restored
            self._restored = None  # a state applies to one iteration only
            if restored_epoch == epoch:
                skip = min(batches, total)
        self._epoch, self._batches = epoch, skip
        return skip

    def count_batch(self) -> None:
        """One more batch of the current epoch yielded."""
        self._batches += 1


class _SkipFirst:
    """The loader's (batch) sampler without the first batches of a resumed epoch.

    DataLoader iterators keep the sampler they got at creation (workers that persist across
    epochs keep it for good), so the number to skip is read from the loader at every ``iter``.
    """

    def __init__(self, sampler: Iterable[Any], loader: ResumableDataLoader) -> None:
        self.sampler = sampler
        self.loader = loader

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return islice(iter(self.sampler), self.loader.skipping, None)


class ResumableDataLoader(EpochPosition, DataLoader):
    """A map-style DataLoader whose position within an epoch is part of the checkpoint.

    Args:
        epoch_source: the epoch an iteration belongs to, read when it draws its first batch (the
            data module passes the trainer's ``current_epoch``); by default the ``epoch`` of the
            batch sampler, of its sampler or of the sampler, which ``set_epoch`` keeps current.

    Every other argument is a DataLoader's, given by keyword after the dataset.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        epoch_source: Callable[[], int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        if isinstance(self.dataset, IterableDataset):
            raise TypeError(
                "ResumableDataLoader skips sampler indices; it needs a map-style dataset"
            )
        # The same loading, drawing from the given (batch) sampler less the skipped batches.
        others = {k: v for k, v in kwargs.items() if k not in ORDER_ARGUMENTS}
        if self.batch_sampler is not None:
            order: dict[str, Any] = {"batch_sampler": _SkipFirst(self.batch_sampler, self)}
        else:
            order = {"sampler": _SkipFirst(self.sampler, self), "batch_size": None}
        self._skipping_loader = DataLoader(dataset, **others, **order)
        self.epoch_source = epoch_source
        self.skipping = 0  # batches the iteration being started leaves out

    def current_epoch(self) -> int:
        """The epoch the next iteration belongs to."""
        if self.epoch_source is not None:
            return int(self.epoch_source())
        batch_sampler = self.batch_sampler
        for owner in (batch_sampler, getattr(batch_sampler, "sampler", None), self.sampler):
            epoch = getattr(owner, "epoch", None)
            if _is_count(epoch):
                return int(epoch)  # type: ignore[arg-type]
        raise TypeError(
            "ResumableDataLoader needs an epoch_source or a sampler with an integer 'epoch'"
        )

    # -------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        # a generator: nothing below runs before the first batch is asked for
        iterator = self._start()
        for batch in iterator:
            self.count_batch()
            yield batch

    def _start(self) -> Iterator[Any]:
        self.skipping = self.batches_to_skip(self.current_epoch(), len(self))
        return iter(self._skipping_loader)
