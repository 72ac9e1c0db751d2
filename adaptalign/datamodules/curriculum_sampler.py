"""Batches that mix many objects, or hold one object only, in a share set from outside.

Ontology-informed contrastive sampling: early in training a batch should show as many different
objects as possible, so the towers first agree on *which object* a pair is about; later, batches
whose pairs all show the same object make every negative a hard one, so the towers must align
the finer context (what the dog is doing, where). :class:`CurriculumBatchSampler` builds both
kinds; a callback (:class:`adaptalign.callbacks.curriculum.ObjectCurriculum`) raises the share of
same-object batches over the epochs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from adaptalign.common.checks import is_finite_number, is_int
from adaptalign.common.errors import ConfigurationError

# Lightning adds a distributed sampler under several processes unless told not to.
SHARDS_ITSELF = (
    "data.sampler='curriculum' shards batches itself; set trainer.use_distributed_sampler: false"
)


class _EpochPool:
    """The pairs not yet used in one epoch, by primary object, with exact remaining counts."""

    def __init__(self, sampler: CurriculumBatchSampler, rng: np.random.Generator) -> None:
        self.sampler = sampler
        self.rng = rng
        self.used = np.zeros(sampler.num_pairs, dtype=bool)
        self.counts = np.array([len(g) for g in sampler.groups], dtype=np.int64)
        self.stacks = [list(rng.permutation(g)) for g in sampler.groups]
        self.untagged = list(rng.permutation(sampler.untagged))
        self.left = sampler.num_pairs

    def take(self, index: int) -> int:
        self.used[index] = True
        self.left -= 1
        obj = self.sampler.primary[index]
        if obj >= 0:
            self.counts[obj] -= 1
        return int(index)

    def take_primary(self, obj: int) -> int:
        stack = self.stacks[obj]
        while self.used[stack[-1]]:  # taken earlier as a secondary member of another batch
            stack.pop()
        return self.take(stack.pop())

    def take_untagged(self) -> int:
        return self.take(self.untagged.pop())  # untagged pairs are only ever taken from here

    def take_members(self, obj: int, count: int) -> list[int]:
        """Up to ``count`` unused pairs that show ``obj`` but have another primary object."""
        members = self.sampler.members[obj]
        unused = members[~self.used[members]]
        return [self.take(i) for i in self.rng.permutation(unused)[:count]]


class SameObjectShare:
    """The share of same-object batches, checked whenever it is set (the curriculum callback
    sets it every epoch, on the in-memory sampler and on a stream's buffered curriculum alike)."""

    _share: float = 0.0

    @property
    def same_object_share(self) -> float:
        """Probability that a batch holds one object only; a curriculum raises it over time."""
        return self._share

    @same_object_share.setter
    def same_object_share(self, value: float) -> None:
        if not is_finite_number(value) or not 0 <= value <= 1:
            raise ConfigurationError(f"same_object_share={value!r}; expected a number from 0 to 1")
        self._share = float(value)


class CurriculumBatchSampler(SameObjectShare, Sampler[list[tuple[int, int]]]):
    """Per-process batches of ``(index, epoch)`` keys, diverse or same-object by a set share.

    Every process builds the same list of *global* batches (``batch_size * num_replicas`` pairs)
    from ``np.random.default_rng([seed, epoch])`` and yields its own slice of each, so all
    processes yield the same number of batches and together cover each global batch once.

    Per epoch, the algorithm is:

    1. Shuffle each object's pairs (those whose *primary*, i.e. first, tag it is) and the
       untagged pairs. Every pair is used at most once per epoch; ``len()`` is
       ``len(tags) // global_batch`` (``drop_last``) and never depends on the share.
    2. For each global batch, draw its kind: same-object with probability
       ``same_object_share``, else diverse.
    3. Same-object batch: among objects with at least ``max(2, min_pairs)`` primary pairs in the
       whole data and at least 2 still unused, pick one with probability proportional to its
       unused primary pairs, and take up to a batch of them. If it has fewer, fill up with unused
       pairs that show the object in a later tag position, and only then with a diverse fill
       (step 4) that avoids the object. When no object qualifies the batch is diverse.
    4. Diverse batch (and any fill): the untagged pairs get a Binomial(slots, untagged / unused)
       share of the slots, so they are used up at the same rate as tagged ones; the other slots
       go to distinct objects that are not yet in the batch, drawn without replacement with
       probability proportional to their unused pairs (so large objects are not left to crowd
       the last batches), one pair each. Only when every object with unused pairs is already
       in the batch, and no untagged pair is left, may an object repeat.
    5. Shuffle the global batch, so every process's slice is a fair sample of it.

    With ``drop_last=False`` the epoch has ``ceil(len(tags) / global_batch)`` batches and the
    last one is filled up with pairs already used this epoch (not repeating one in the batch).

    The epoch's plan is made when its first batch is drawn, from the ``epoch`` and
    ``same_object_share`` set at that moment; both can be set at any time before that.
    """

    def __init__(
        self,
        tags: Sequence[Sequence[str]],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        same_object_share: float = 0.0,
        drop_last: bool = True,
        min_pairs: int = 1,
        epoch: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(tags, Sampler):
            # How Lightning rebuilds a batch sampler to shard it (``use_distributed_sampler``):
            # the batches are sharded here already, and a sampler's indices are no tags.
            raise ConfigurationError(SHARDS_ITSELF)
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_replicas", num_replicas, 1),
            ("min_pairs", min_pairs, 1),
            ("seed", seed, 0),
            ("epoch", epoch, 0),
        ):
            if not is_int(value) or value < low:
                raise ConfigurationError(
                    f"CurriculumBatchSampler {name}={value!r}; expected an integer >= {low}"
                )
        if not is_int(rank) or not 0 <= rank < num_replicas:
            raise ConfigurationError(
                f"CurriculumBatchSampler rank={rank!r}; expected an integer from 0 to "
                f"num_replicas - 1 = {num_replicas - 1}"
            )
        self.tags = [tuple(t) for t in tags]
        self.batch_size = int(batch_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.min_pairs = int(min_pairs)
        self.epoch = int(epoch)
        self.same_object_share = same_object_share
        if self.num_pairs < self.global_batch_size:
            raise ConfigurationError(
                f"{self.num_pairs} training pairs are fewer than one global batch (batch_size="
                f"{self.batch_size} x {self.num_replicas} processes)"
            )
        self.objects = sorted({t[0] for t in self.tags if t})
        ids = {name: k for k, name in enumerate(self.objects)}
        self.primary = np.array([ids[t[0]] if t else -1 for t in self.tags], dtype=np.int64)
        self.groups = [np.flatnonzero(self.primary == k) for k in range(len(self.objects))]
        self.untagged = np.flatnonzero(self.primary < 0)
        secondary: dict[int, list[int]] = {}
        for i, t in enumerate(self.tags):
            for name in dict.fromkeys(t[1:]):
                if name in ids and name != t[0]:
                    secondary.setdefault(ids[name], []).append(i)
        self.members = [
            np.array(secondary.get(k, []), dtype=np.int64) for k in range(len(self.objects))
        ]
        sizes = np.array([len(g) for g in self.groups], dtype=np.int64)
        self.eligible = sizes >= max(2, self.min_pairs)
        # (epoch, share) of the latest iteration's plan, set when it draws its first batch
        self.last_plan: tuple[int, float] | None = None
        self._cache: tuple[int, float, list[list[int]]] | None = None

    # ------------------------------------------------------------------ settings
    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next iteration: it seeds the batches and goes into every key."""
        if not is_int(epoch) or epoch < 0:
            raise ConfigurationError(f"epoch={epoch!r}; expected an integer >= 0")
        self.epoch = int(epoch)

    @property
    def num_pairs(self) -> int:
        return len(self.tags)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_pairs // self.global_batch_size
        return math.ceil(self.num_pairs / self.global_batch_size)

    # ------------------------------------------------------------------ batches
    def global_batches(
        self, epoch: int | None = None, share: float | None = None
    ) -> list[list[int]]:
        """All processes' batches of an epoch, as dataset indices.

        ``epoch`` and ``share`` default to the current settings; giving them shows the plan of
        another epoch (what was trained then, say) without changing the sampler.
        """
        epoch = self.epoch if epoch is None else int(epoch)
        share = self.same_object_share if share is None else float(share)
        if self._cache is not None and self._cache[:2] == (epoch, share):
            return self._cache[2]
        rng = np.random.default_rng([self.seed, epoch])
        pool = _EpochPool(self, rng)
        batches = []
        for _ in range(len(self)):
            same = rng.random() < share
            batch = self._same_object(pool) if same else None
            if batch is None:
                batch = self._diverse(pool, self.global_batch_size, set())
            if len(batch) < self.global_batch_size:  # only the last batch without drop_last
                batch += self._pad(rng, batch)
            batches.append([batch[i] for i in rng.permutation(len(batch))])
        self._cache = (epoch, share, batches)
        return batches

    def _same_object(self, pool: _EpochPool) -> list[int] | None:
        candidates = np.flatnonzero(self.eligible & (pool.counts >= 2))
        if candidates.size == 0:
            return None
        weights = pool.counts[candidates].astype(np.float64)
        obj = int(candidates[pool.rng.choice(candidates.size, p=weights / weights.sum())])
        size = self.global_batch_size
        batch = [pool.take_primary(obj) for _ in range(min(size, int(pool.counts[obj])))]
        if len(batch) < size:
            batch += pool.take_members(obj, size - len(batch))
        if len(batch) < size:
            batch += self._diverse(pool, size - len(batch), {obj})
        return batch

    def _diverse(self, pool: _EpochPool, slots: int, present: set[int]) -> list[int]:
        batch: list[int] = []
        in_batch = np.zeros(len(self.objects), dtype=bool)
        in_batch[list(present)] = True
        while len(batch) < slots and pool.left > 0:
            need = slots - len(batch)
            available = np.flatnonzero((pool.counts > 0) & ~in_batch)
            untagged = len(pool.untagged)
            if available.size == 0 and untagged == 0:
                in_batch[:] = False  # every object left is in the batch already: repeats allowed
                continue
            tagged = int(pool.counts.sum())
            extra = int(pool.rng.binomial(need, untagged / (untagged + tagged))) if untagged else 0
            count = min(need - extra, int(available.size))
            if count > 0:
                weights = pool.counts[available].astype(np.float64)
                chosen = pool.rng.choice(
                    available, size=count, replace=False, p=weights / weights.sum()
                )
                for obj in chosen:
                    batch.append(pool.take_primary(int(obj)))
                    in_batch[obj] = True
            for _ in range(min(untagged, need - count)):  # also the slots objects could not fill
                batch.append(pool.take_untagged())
        return batch

    def _pad(self, rng: np.random.Generator, batch: list[int]) -> list[int]:
        """Pairs already used this epoch that fill the last batch up to full size."""
        outside = np.setdiff1d(np.arange(self.num_pairs), np.array(batch, dtype=np.int64))
        picks = rng.choice(outside, size=self.global_batch_size - len(batch), replace=False)
        return [int(i) for i in picks]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self._iterate()

    def _iterate(self) -> Iterator[list[tuple[int, int]]]:
        # a generator: the plan is made at the first draw, after the epoch's settings are in
        epoch = self.epoch
        self.last_plan = (epoch, self.same_object_share)
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for batch in self.global_batches(epoch):
            yield [(index, epoch) for index in batch[rows]]


def _index(key: int | tuple[int, int] | Any) -> int:
    return int(key[0]) if isinstance(key, tuple | list) else int(key)


def batch_statistics(
    batches: Iterable[Sequence[int | tuple[int, int]]], tags: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Mean diversity and purity of batches of dataset indices or ``(index, epoch)`` keys.

    * diversity: distinct primary objects in a batch / batch size; an untagged pair counts as
      one more distinct object (nothing says it repeats one). 1 means no object repeats.
    * purity: share of the batch's pairs that show (in any tag position) the object most of
      them show. 1 means every pair shows the same object; untagged pairs never count.
    """
    diversity: list[float] = []
    purity: list[float] = []
    for batch in batches:
        rows = [tuple(tags[_index(key)]) for key in batch]
        if not rows:
            continue
        distinct = len({t[0] for t in rows if t}) + sum(1 for t in rows if not t)
        shown = Counter(name for t in rows for name in dict.fromkeys(t))
        diversity.append(distinct / len(rows))
        purity.append(max(shown.values()) / len(rows) if shown else 0.0)
    return {
        "batches": float(len(diversity)),
        "diversity": float(np.mean(diversity)) if diversity else math.nan,
        "purity": float(np.mean(purity)) if purity else math.nan,
    }


def batch_purity(objects: Sequence[Sequence[str]]) -> float:
    """Purity of one batch given each pair's tags (what a collated batch's ``objects`` holds)."""
    return batch_statistics([list(range(len(objects)))], objects)["purity"]
