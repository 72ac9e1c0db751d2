"""The training stream over WebDataset shards: whole shards per loader worker, full batches only.

A map-style loader can hand any pair to any process; a stream of tar shards can only be split
by shard. Each epoch is therefore planned up front (:func:`plan_epoch`) from the index's pair
counts: the shards are dealt to the ``ranks x workers`` slots, balanced by pair count, in an
order drawn from ``(seed, epoch)`` so that which shards share a slot changes between epochs.
Every slot trains on whole batches only, and every rank on the same number of them, since a
process that runs out of batches before the others leaves them waiting in a collective for good.

:class:`ShardPairs` is one rank's stream. Each loader worker reads its slot's shards in plan
order, passes over the samples the run does not use without decoding them, shuffles the rest in
a buffer of undecoded samples, turns each into a training item, groups items into batches
(consecutive ones, or the curriculum's), collates them and yields exactly the slot's number of
batches. A sample that cannot be decoded either stops the run or, with ``skip_bad``, is counted
and left out; if that leaves a slot short, the missing batches are made of items the slot
already used, so the processes stay in step. Each batch carries both counts (``stream_bad``,
``stream_repeated``) for the per-epoch totals.

:class:`ShardPairLoader` runs the stream in DataLoader workers and, like
:class:`~adaptalign.datamodules.resumable.ResumableDataLoader`, continues an interrupted epoch
at the batch where it stopped.
"""

from __future__ import annotations

import heapq
import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle

from adaptalign.common.checks import is_int
from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.resumable import EpochPosition
from adaptalign.datamodules.shard_files import IMAGE_EXTENSIONS, read_samples

log = logging.getLogger(__name__)

# Counters every yielded batch carries (0-dim integer tensors), for the per-epoch totals.
COUNTERS = ("stream_bad", "stream_repeated")

# A sample's members by extension: a shard's bytes, or rows a reader of cached features gives.
Members = dict[str, bytes | torch.Tensor]
MakeItem = Callable[[str, str, Members, int], dict]
Collate = Callable[[list[dict]], dict]
Batcher = Callable[[Iterator[dict], int, np.random.Generator], Iterator[list[dict]]]
ReadShard = Callable[[str], Iterable[tuple[str, Members]]]
Sample = tuple[str, str, Members]  # shard, key, members


def _is_count(value: object, least: int = 0) -> bool:
    return is_int(value) and value >= least  # type: ignore[operator]


# --------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class SlotPlan:
    """What one loader worker of one rank reads and yields in an epoch.

    ``shards`` are indices into the shard list, in reading order; ``pairs`` the pairs in use in
    them; ``batches`` the full batches the slot yields (fewer than ``pairs // batch_size`` when
    its rank gives some up to match the smallest rank).
    """

    rank: int
    worker: int
    shards: tuple[int, ...]
    pairs: int
    batches: int


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's shards per (rank, worker) slot, and what the epoch trains on.

    ``pairs_in_use = pairs_trained + left_in_partial_batches + left_by_rank_equalisation``:
    pairs that fill no full batch of their slot, and the batches a rank gives up so that every
    rank yields ``batches_per_rank``, are left over this epoch (a later epoch's plan leaves out
    others). Pairs a slot reads beyond its batches stand in for bad samples it skips.
    """

    epoch: int
    world: int
    workers: int  # slots per rank: the loader's workers, or 1 without workers
    batch_size: int
    slots: tuple[SlotPlan, ...]  # rank-major: slot ``rank * workers + worker``
    batches_per_rank: int
    pairs_in_use: int
    pairs_trained: int
    left_in_partial_batches: int
    left_by_rank_equalisation: int

    @property
    def pairs_left(self) -> int:
        """Pairs in use that this epoch does not train on."""
        return self.left_in_partial_batches + self.left_by_rank_equalisation

    def slot(self, rank: int, worker: int) -> SlotPlan:
        """The plan of ``worker`` (0 without workers) on ``rank``."""
        return self.slots[rank * self.workers + worker]

    def rank_caps(self, rank: int) -> list[int]:
        """The batches of each of ``rank``'s workers, in worker order."""
        return [self.slot(rank, worker).batches for worker in range(self.workers)]

    def describe(self) -> str:
        """One line for the log: the split and what is left over, and why."""
        return (
            f"epoch {self.epoch}: shards over {self.world} ranks x {self.workers} workers, "
            f"{self.batches_per_rank} batches of {self.batch_size} per rank; "
            f"{self.pairs_in_use} pairs in use, {self.pairs_trained} trained on, "
            f"{self.pairs_left} left over ({self.left_in_partial_batches} in partial batches, "
            f"{self.left_by_rank_equalisation} to give every rank the same batches)"
        )


def _deal(
    shards: Sequence[int], counts: Sequence[int], position: Sequence[int], bins: int
) -> list[list[int]]:
    """``shards`` dealt to ``bins``, each to the lightest bin (fewest pairs, then fewest shards).

    Largest first keeps the bins balanced to within about one small shard; shards of similar
    size come in runs of ``bins``, and each run is dealt in the epoch's order (``position``),
    so which shards share a bin changes from epoch to epoch, not only among equal-sized ones.
    """
    by_size = sorted(shards, key=lambda s: (-counts[s], position[s]))
    order = [
        shard
        for start in range(0, len(by_size), bins)
        for shard in sorted(by_size[start : start + bins], key=position.__getitem__)
    ]
    members: list[list[int]] = [[] for _ in range(bins)]
    lightest = [(0, 0, b) for b in range(bins)]  # (pairs, shards, bin): a heap, lightest first
    for shard in order:
        pairs, held, b = heapq.heappop(lightest)
        members[b].append(shard)
        heapq.heappush(lightest, (pairs + int(counts[shard]), held + 1, b))
    return members


def _equalise(caps: list[int], target: int) -> list[int]:
    """``caps`` lowered to sum to ``target``, a batch at a time from the largest (last on ties)."""
    caps = list(caps)
    while sum(caps) > target:
        largest = max(range(len(caps)), key=lambda w: (caps[w], w))
        caps[largest] -= 1
    return caps


def _refusal(counts: Sequence[int], world: int, workers: int, batch_size: int, rank: int) -> str:
    message = (
        f"data.shards: {len(counts)} shards with {sum(counts)} pairs in use leave rank {rank} of "
        f"{world} without a full batch of data.batch_size={batch_size} "
        f"({workers} loader workers per rank, each reading whole shards)"
    )
    if len(counts) < world * workers:
        message += (
            f"; fewer shards than ranks x workers ({world} x {workers}) cannot be split by "
            "shard: write more, smaller shards or use fewer processes or data.num_workers"
        )
    return message + "; expected at least one full batch per rank"


def plan_epoch(
    counts: Sequence[int], world: int, workers: int, batch_size: int, seed: int, epoch: int
) -> EpochPlan:
    """Shards dealt to ``world x max(workers, 1)`` slots for ``epoch``, every rank equal batches.

    ``counts[i]`` is the number of pairs in use in shard ``i``. The same arguments give the
    same plan in every process, which is what lets each process and worker compute its own part.
    Shards are dealt to ranks first, then each rank's shards to its workers, so the ranks are as
    even as the shard sizes allow (their surplus batches are dropped). Raises
    :class:`ConfigurationError` when some rank would get no full batch.
    """
    if not all(_is_count(c) for c in counts):
        raise ValueError(f"pair counts {list(counts)!r}; expected integers >= 0")
    if not (_is_count(world, 1) and _is_count(workers) and _is_count(batch_size, 1)):
        raise ValueError(
            f"world={world!r}, workers={workers!r}, batch_size={batch_size!r}; expected "
            "world >= 1, workers >= 0, batch_size >= 1"
        )
    slots_per_rank = max(int(workers), 1)
    order = np.random.default_rng([seed, epoch]).permutation(len(counts))
    position = [0] * len(counts)
    for place, shard in enumerate(order):
        position[int(shard)] = place
    per_rank = _deal(range(len(counts)), counts, position, world)
    layout: list[list[tuple[int, ...]]] = []
    for shards in per_rank:
        per_worker = _deal(shards, counts, position, slots_per_rank)
        layout.append([tuple(sorted(s, key=position.__getitem__)) for s in per_worker])
    full = [[sum(counts[s] for s in shards) // batch_size for shards in ranks] for ranks in layout]
    target = min(sum(caps) for caps in full)
    if target == 0:
        empty = min(range(world), key=lambda r: (sum(full[r]), r))
        raise ConfigurationError(_refusal(counts, world, slots_per_rank, batch_size, empty))
    slots = []
    for rank, ranks in enumerate(layout):
        caps = _equalise(full[rank], target)
        for worker, shards in enumerate(ranks):
            pairs = sum(counts[s] for s in shards)
            slots.append(SlotPlan(rank, worker, shards, pairs, caps[worker]))
    in_use = sum(int(c) for c in counts)
    whole = sum(sum(caps) for caps in full)
    return EpochPlan(
        epoch=int(epoch),
        world=int(world),
        workers=slots_per_rank,
        batch_size=int(batch_size),
        slots=tuple(slots),
        batches_per_rank=target,
        pairs_in_use=in_use,
        pairs_trained=world * target * batch_size,
        left_in_partial_batches=in_use - whole * batch_size,
        left_by_rank_equalisation=(whole - world * target) * batch_size,
    )


def resume_point(caps: Sequence[int], batches: int) -> tuple[list[int], int]:
    """Where each worker stands after the loader yielded ``batches``, and whose turn is next.

    A DataLoader takes batches from its workers in turn (worker ``w``'s ``j``-th batch is
    global batch ``j * W + w`` while all run); a worker whose batches end drops out of the turn.
    Returns how many of each worker's batches were among the first ``batches``, and the worker
    after the one that yielded last (next in the turn, if its batches have not ended). A new
    DataLoader's turn starts at its worker 0, so a resumed loader's worker ``i`` plays slot
    ``(next + i) % W``: its batches then come in the order the interrupted loader's would have.
    """
    skips = [0] * len(caps)
    left, following = batches, 0
    for turn in range(max(caps, default=0)):
        for worker, cap in enumerate(caps):
            if left > 0 and turn < cap:
                skips[worker] += 1
                left -= 1
                following = (worker + 1) % len(caps)
    return skips, following


# ------------------------------------------------------------------------------- the stream
def consecutive_batches(
    items: Iterator[dict], batch_size: int, rng: np.random.Generator
) -> Iterator[list[dict]]:
    """The default batcher: items in the order they come, ``batch_size`` at a time."""
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []


def read_pairs(url: str) -> Iterator[tuple[str, Members]]:
    """The default shard reader: each sample's image member (``read_samples``); its captions
    come from the index pass, so the stream reads no text."""
    return read_samples(url, IMAGE_EXTENSIONS)


def _worker_message(text: str) -> str | None:
    """The message a loader worker raised, without the traceback DataLoader wraps it in.

    A worker's error reaches the main process as the same type with the worker's whole
    traceback as its message; the command line reports such errors as one line, its own.
    """
    marker = f"{DatasetFormatError.__name__}: "
    if "Traceback" not in text or marker not in text:
        return None
    return text.rsplit(marker, 1)[1].strip()


def _as_given(batch: dict) -> dict:
    """The loader's collate: the stream has collated its batches already."""
    return batch


class _Tally:
    """Bad samples skipped since the worker's previous batch."""

    def __init__(self) -> None:
        self.bad = 0

    def take(self) -> int:
        bad, self.bad = self.bad, 0
        return bad


class _RecentItems:
    """The last ``capacity`` items handed to the batcher, and whether a batch has used them.

    A slot that skipped bad samples may run out of items before its last batches; those are
    then made of these (the ones no batch used first), so they repeat as few pairs as possible.
    Items are tracked by identity while held, which is what a batch of them holds too.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[int, tuple[dict, bool]] = OrderedDict()

    def add(self, item: dict) -> dict:
        self.items[id(item)] = (item, False)
        if len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return item

    def use(self, batch: list[dict]) -> int:
        """Mark ``batch`` used; how many of its items a batch had used before (repeats)."""
        repeated = 0
        in_batch: set[int] = set()
        for item in batch:
            held = self.items.get(id(item))
            if id(item) in in_batch or (held is not None and held[1]):
                repeated += 1
            in_batch.add(id(item))
            if held is not None:
                self.items[id(item)] = (item, True)
                self.items.move_to_end(id(item))
        return repeated

    def fill(self, batch_size: int) -> list[dict]:
        """A batch of held items, unused ones first, each pair once while enough are held."""
        held = sorted(self.items.values(), key=lambda entry: entry[1])
        return [held[i % len(held)][0] for i in range(batch_size)]


def _check_dataset_arguments(
    urls: Sequence[str], keys_in_use: Sequence[Sequence[str]], sizes: dict[str, Any]
) -> None:
    if len(urls) != len(keys_in_use):
        raise ValueError(f"{len(urls)} shard urls but {len(keys_in_use)} lists of keys in use")
    if not (_is_count(sizes["batch_size"], 1) and _is_count(sizes["world"], 1)):
        raise ValueError(f"batch_size and world must be integers >= 1, not {sizes!r}")
    if not (_is_count(sizes["rank"]) and sizes["rank"] < sizes["world"]):
        raise ValueError(f"rank={sizes['rank']!r}; expected 0 <= rank < world={sizes['world']}")
    if not (_is_count(sizes["seed"]) and _is_count(sizes["shuffle_buffer"])):
        raise ValueError(f"seed and shuffle_buffer must be integers >= 0, not {sizes!r}")


class ShardPairs(IterableDataset):
    """One rank's training batches, streamed from whole shards by each loader worker.

    Args:
        urls: the training shards.
        keys_in_use: per shard, the keys of the samples this run trains on (the index's, less
            bad samples and pairs held out); other samples are passed over undecoded.
        make_item: ``(shard, key, members, epoch) -> item``; decodes the sample and raises
            :class:`DatasetFormatError` for one it cannot use.
        collate: a list of ``batch_size`` items -> the batch (it must not change the items: a
            slot short of batches reuses them).
        batch_size, rank, world, seed: this process's batches and place; the seed orders shards
            and seeds each worker's buffer and batcher.
        shuffle_buffer: undecoded samples held for shuffling (0 or 1: shard order).
        skip_bad: count and leave out samples ``make_item`` refuses (and keys in use that the
            shard no longer holds) instead of stopping. A shard that cannot be read stops the
            run either way: the index pass read it whole, so it has changed or gone since.
        batcher: ``(items, batch_size, rng) -> batches`` of exactly ``batch_size`` items each
            (default: consecutive items); items it leaves unbatched stand in for bad samples.
        read_shard: ``url -> (key, members)`` in shard order (default: :func:`read_pairs`).

    The epoch is read when an iteration starts (:meth:`set_epoch`); DataLoader workers get a
    copy of the dataset then, so they must not persist across epochs (:class:`ShardPairLoader`
    starts them afresh each epoch) or they would stream a stale epoch.
    """

    def __init__(
        self,
        urls: Sequence[str],
        keys_in_use: Sequence[Sequence[str]],
        make_item: MakeItem,
        collate: Collate,
        *,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        skip_bad: bool = False,
        batcher: Batcher | None = None,
        read_shard: ReadShard | None = None,
    ) -> None:
        sizes = dict(
            batch_size=batch_size, rank=rank, world=world, seed=seed, shuffle_buffer=shuffle_buffer
        )
        _check_dataset_arguments(urls, keys_in_use, sizes)
        self.urls = list(urls)
        self.keys_in_use = [frozenset(keys) for keys in keys_in_use]
        self.counts = [len(keys) for keys in self.keys_in_use]
        self.make_item = make_item
        self.collate = collate
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world = int(world)
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.skip_bad = bool(skip_bad)
        self.batcher: Batcher = batcher or consecutive_batches
        self.read_shard: ReadShard = read_shard or read_pairs
        self.epoch = 0
        self.resume_batches = 0  # batches of this epoch the next iteration leaves out

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration streams (a batcher with ``set_epoch`` is told too)."""
        self.epoch = int(epoch)
        if hasattr(self.batcher, "set_epoch"):
            self.batcher.set_epoch(self.epoch)

    def plan(self, epoch: int, workers: int) -> EpochPlan:
        """The epoch's plan for a loader with ``workers`` workers (the same in every process)."""
        return plan_epoch(self.counts, self.world, workers, self.batch_size, self.seed, epoch)

    def __iter__(self) -> Iterator[dict]:
        # read the settings now: a loader resets ``resume_batches`` once its workers have them
        info = get_worker_info()
        worker, workers = (0, 0) if info is None else (info.id, info.num_workers)
        plan = self.plan(self.epoch, workers)
        skips, following = resume_point(plan.rank_caps(self.rank), self.resume_batches)
        slot = plan.slot(self.rank, (worker + following) % plan.workers)
        return self._slot_batches(slot, plan.epoch, skips[slot.worker])

    # ---------------------------------------------------------------------- one worker
    def _slot_batches(self, slot: SlotPlan, epoch: int, skip: int) -> Iterator[dict]:
        """Exactly ``slot.batches`` batches; the first ``skip`` are made but not yielded.

        Leaving out batches by replaying them (reading, decoding and batching their items)
        keeps the buffer, batcher and bad-sample order exactly those of the run resumed.
        """
        if slot.batches == 0:
            return
        seeds = np.random.SeedSequence([self.seed, epoch, self.rank, slot.worker]).spawn(2)
        buffer_rng = random.Random(int(seeds[0].generate_state(1)[0]))
        batch_rng = np.random.default_rng(seeds[1])
        tally = _Tally()
        recent = _RecentItems(self.batch_size)
        samples: Iterator[Sample] = self._samples(slot, tally)
        if self.shuffle_buffer > 1:
            samples = shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=buffer_rng)(samples)
        items = (recent.add(item) for item in self._items(samples, epoch, tally))
        batches = self.batcher(items, self.batch_size, batch_rng)
        for number in range(slot.batches):
            batch = next(batches, None)
            if batch is None:
                batch = self._filler(slot, recent, tally)
            elif len(batch) != self.batch_size:
                raise ValueError(
                    f"the batcher gave a batch of {len(batch)} items; expected {self.batch_size}"
                )
            repeated = recent.use(batch)
            bad = tally.take()
            if number < skip:
                continue
            collated = self.collate(batch)
            collated["stream_bad"] = torch.tensor(bad)
            collated["stream_repeated"] = torch.tensor(repeated)
            yield collated

    def _samples(self, slot: SlotPlan, tally: _Tally) -> Iterator[Sample]:
        """The slot's samples in use, shard by shard in plan order, undecoded."""
        for index in slot.shards:
            url, in_use = self.urls[index], self.keys_in_use[index]
            if not in_use:
                continue
            found: set[str] = set()
            for key, members in self.read_shard(url):
                if key in in_use:
                    found.add(key)
                    yield url, key, members
            for key in sorted(in_use - found):
                self._bad(
                    DatasetFormatError(
                        f"{url}: sample '{key}' is in the shard's index but not in the shard; "
                        "expected the shard unchanged since it was indexed"
                    ),
                    tally,
                )

    def _items(self, samples: Iterator[Sample], epoch: int, tally: _Tally) -> Iterator[dict]:
        """Training items of the samples; a refused one stops the stream or, skipped, is counted."""
        for shard, key, members in samples:
            try:
                yield self.make_item(shard, key, members, epoch)
            except DatasetFormatError as error:
                self._bad(error, tally)

    def _bad(self, error: DatasetFormatError, tally: _Tally) -> None:
        if not self.skip_bad:
            raise error
        tally.bad += 1
        log.warning("skipped a bad sample (data.skip_bad_images): %s", error)

    def _filler(self, slot: SlotPlan, recent: _RecentItems, tally: _Tally) -> list[dict]:
        """A batch of items the slot used already, for a batch its bad samples left it short of."""
        if not recent.items:
            names = ", ".join(self.urls[index] for index in slot.shards)
            raise DatasetFormatError(
                f"rank {self.rank} worker {slot.worker}: no usable sample in its shards ({names}); "
                f"{tally.bad} bad, yet it owes {slot.batches} batches; expected shards with "
                "readable samples (remove these from data.shards)"
            )
        return recent.fill(self.batch_size)


# ------------------------------------------------------------------------------- the loader
class ShardPairLoader(EpochPosition, DataLoader):
    """The DataLoader of a :class:`ShardPairs` stream whose position within an epoch is saved.

    Like :class:`~adaptalign.datamodules.resumable.ResumableDataLoader` it reports
    ``{"epoch", "batches"}`` as its state and, restored, its next iteration of the same epoch
    leaves out exactly the batches already yielded: each worker works out how many of its own
    batches those were and replays that part of its stream without yielding it (reading and
    decoding the samples again: the buffer, batcher and bad samples must come out as before),
    and the workers take the slots in the turn the interrupted loader had reached
    (:func:`resume_point`).

    Workers are started afresh for every iteration (no ``persistent_workers``): they get the
    dataset, and so the epoch and the batches to leave out, when the iteration starts.

    Args:
        epoch_source: the epoch an iteration belongs to, read when its first batch is asked for
            (the data module passes the trainer's ``current_epoch``); by default the dataset's
            ``epoch``, which :meth:`ShardPairs.set_epoch` sets.

    Other keyword arguments are a DataLoader's (``num_workers``, ``pin_memory``, ...); those
    that batch, order or keep workers are the stream's own and refused. ``len()`` is the
    batches per rank of the epoch the next iteration belongs to.
    """

    OWN_ARGUMENTS = frozenset(
        {"batch_size", "shuffle", "sampler", "batch_sampler", "drop_last", "collate_fn"}
        | {"persistent_workers", "in_order"}
    )

    def __init__(
        self,
        dataset: ShardPairs,
        *,
        epoch_source: Callable[[], int] | None = None,
        **kwargs: Any,
    ) -> None:
        refused = sorted(self.OWN_ARGUMENTS & set(kwargs))
        if refused:
            raise TypeError(f"ShardPairLoader batches and orders itself; drop {refused}")
        kwargs.setdefault("generator", torch.Generator().manual_seed(dataset.seed))
        super().__init__(dataset, batch_size=None, collate_fn=_as_given, **kwargs)
        self.epoch_source = epoch_source

    def current_epoch(self) -> int:
        """The epoch the next iteration belongs to."""
        if self.epoch_source is not None:
            return int(self.epoch_source())
        return self.dataset.epoch  # type: ignore[attr-defined]

    def plan(self) -> EpochPlan:
        """The plan of the epoch the next iteration belongs to, for this loader's workers."""
        return self.dataset.plan(self.current_epoch(), self.num_workers)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return self.plan().batches_per_rank

    # -------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:  # type: ignore[override]
        return self._iterate()

    def _iterate(self) -> Iterator[dict]:
        # a generator: the epoch is read, and workers start, when the first batch is asked for
        iterator = self._start()
        try:
            for batch in iterator:
                self.count_batch()
                yield batch
        except DatasetFormatError as error:
            message = _worker_message(str(error))
            if message is None:
                raise
            raise DatasetFormatError(message) from None

    def _start(self) -> Iterator[dict]:
        dataset: ShardPairs = self.dataset  # type: ignore[assignment]
        epoch = self.current_epoch()
        # len() plans the epoch here, so a refusal comes from the main process
        skip = self.batches_to_skip(epoch, len(self))
        dataset.set_epoch(epoch)
        dataset.resume_batches = skip
        try:
            iterator = super().__iter__()  # workers copy the dataset here
        finally:
            dataset.resume_batches = 0
        return iterator
