"""The ontology curriculum for streamed pairs: diverse and same-object batches from a buffer.

The in-memory :class:`~adaptalign.datamodules.curriculum_sampler.CurriculumBatchSampler` plans a
whole epoch over every training pair's tags. A stream of WebDataset shards never holds the epoch:
each loader worker sees its own shards, a window of pairs at a time. :class:`BufferCurriculum`
runs the same batch-drawing algorithm over each window: it collects ``window`` pairs, draws as
many full batches from them as it can (same-object with probability ``same_object_share``, else
object-diverse), and carries the pairs it did not use into the next window. So a same-object
batch can only gather the pairs of one object that are in the window at the same time: the
larger the window, the closer the batches come to the in-memory sampler's (which sees the whole
epoch), and an object rarer than one pair per window never fills a same-object batch (the batch
is then filled up by the sampler's rules: pairs showing the object in a later tag, then diverse
pairs).

The share reaches the loader workers with the dataset when an epoch's iteration starts, set by
the :class:`~adaptalign.callbacks.curriculum.ObjectCurriculum` callback like the in-memory
sampler's.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from adaptalign.common.checks import is_int
from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.curriculum_sampler import CurriculumBatchSampler, SameObjectShare

# Seeds of the windows' plans are drawn from the stream's generator in this range.
SEED_RANGE = 2**31


class BufferCurriculum(SameObjectShare):
    """Draws curriculum batches from consecutive windows of streamed items.

    Called as a stream's batcher: ``curriculum(items, batch_size, rng)`` turns items (dicts with
    an ``objects`` tuple, the pair's ontology tags) into full batches. ``min_pairs`` is the
    in-memory sampler's: the fewest pairs of an object, here within the window, for a
    same-object batch of it.
    """

    def __init__(
        self, window: int, min_pairs: int = 1, same_object_share: float = 0.0, epoch: int = 0
    ) -> None:
        if not is_int(window) or window < 1:
            raise ConfigurationError(
                f"data.shuffle_buffer={window!r} (the curriculum's window of pairs); expected an "
                "integer >= 1"
            )
        self.window = int(window)
        self.min_pairs = int(min_pairs)
        self.same_object_share = same_object_share
        self.epoch = int(epoch)
        # The main process never sees a worker's plans; the callback's check needs the attribute.
        self.last_plan: tuple[int, float] | None = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration trains (the stream seeds its windows from it too)."""
        self.epoch = int(epoch)

    def __call__(
        self, items: Iterator[dict], batch_size: int, rng: np.random.Generator
    ) -> Iterator[list[dict]]:
        if self.window < batch_size:
            raise ConfigurationError(
                f"data.shuffle_buffer={self.window} is smaller than one batch "
                f"(data.batch_size={batch_size}); the curriculum draws batches from a buffer of "
                "at least one batch of pairs"
            )
        pending: list[dict] = []
        for item in items:
            pending.append(item)
            if len(pending) >= self.window:
                yield from self._draw(pending, batch_size, rng)
        while len(pending) >= batch_size:
            yield from self._draw(pending, batch_size, rng)

    def _draw(
        self, pending: list[dict], batch_size: int, rng: np.random.Generator
    ) -> Iterator[list[dict]]:
        """Every full batch the window's plan makes; the unused pairs stay in ``pending``."""
        sampler = CurriculumBatchSampler(
            [item["objects"] for item in pending],
            batch_size,
            seed=int(rng.integers(SEED_RANGE)),
            same_object_share=self.same_object_share,
            min_pairs=self.min_pairs,
        )
        used: set[int] = set()
        batches = sampler.global_batches()
        for batch in batches:
            used.update(batch)
        window = list(pending)
        pending[:] = [item for i, item in enumerate(window) if i not in used]
        for batch in batches:
            yield [window[i] for i in batch]
