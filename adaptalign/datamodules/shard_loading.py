"""The data module's loaders for pairs stored in shards: the training stream and evaluation images.

Training pairs stream from their shards (:mod:`~adaptalign.datamodules.shard_stream`): each
sample's image bytes, or its frozen features read back per shard, become the same training item
the in-memory loader gives (:meth:`TrainPairs.streamed`: the caption of the epoch, its cached
features, its cluster). Evaluation splits are small and each image is evaluated with all its
captions, so their images are read from their shards once, into memory, and served by id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from adaptalign.common.errors import DatasetFormatError
from adaptalign.datamodules.datasets import TrainPairs, collate_pairs
from adaptalign.datamodules.records import Record
from adaptalign.datamodules.shard_curriculum import BufferCurriculum
from adaptalign.datamodules.shard_features import image_member
from adaptalign.datamodules.shard_stream import ReadShard, ShardPairLoader, ShardPairs, read_pairs

FEATURES = "image_features"  # the member a reader of cached features hands over


def is_streamed(records: Sequence[Record]) -> bool:
    """Whether ``records`` are pairs stored in shards (a split is all one or the other)."""
    return bool(records) and bool(records[0].shard)


def by_shard(records: Sequence[Record]) -> dict[str, list[Record]]:
    """``records`` grouped by their shard, shards and records in the order given."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record.shard, []).append(record)
    return groups


def shard_keys(records: Sequence[Record]) -> tuple[list[str], list[list[str]]]:
    """The shards of ``records`` in order, and per shard the keys of its records."""
    groups = by_shard(records)
    return list(groups), [[r.key for r in group] for group in groups.values()]


def shard_image_ids(records: Sequence[Record]) -> list[list[int]]:
    """Per shard of :func:`shard_keys`, the image ids of its records, in the same order."""
    return [[r.image_id for r in group] for group in by_shard(records).values()]


def streamed_image(url: str, key: str, members: dict) -> bytes | Tensor:
    """A streamed sample's image: its cached features, or the bytes of its image member."""
    if FEATURES in members:
        return members[FEATURES]
    return image_member(url, key, members)


class StreamedItem:
    """``(shard, key, members, epoch) -> item`` for the stream: the training item of that pair.

    A class, not a closure, so loader workers started by spawn can take it along.
    """

    def __init__(self, pairs: TrainPairs) -> None:
        self.pairs = pairs
        self.positions = {(r.shard, r.key): i for i, r in enumerate(pairs.records)}

    def __call__(self, shard: str, key: str, members: dict, epoch: int) -> dict:
        image = streamed_image(shard, key, members)
        return self.pairs.streamed(self.positions[(shard, key)], epoch, image)


def stream_loader(
    pairs: TrainPairs,
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    shuffle_buffer: int,
    skip_bad: bool,
    num_workers: int = 0,
    epoch_source: Callable[[], int] | None = None,
    curriculum: BufferCurriculum | None = None,
    read_shard: ReadShard | None = None,
) -> ShardPairLoader:
    """This process's training batches streamed from the shards of ``pairs``' records.

    ``read_shard`` replaces reading the image members (a reader of cached frozen features).
    """
    urls, keys = shard_keys(pairs.records)
    stream = ShardPairs(
        urls,
        keys,
        StreamedItem(pairs),
        collate_pairs,
        batch_size=batch_size,
        rank=rank,
        world=world,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        skip_bad=skip_bad,
        batcher=curriculum,
        read_shard=read_shard,
    )
    return ShardPairLoader(stream, num_workers=num_workers, epoch_source=epoch_source)


def evaluation_images(records: Sequence[Record]) -> dict[int, bytes]:
    """The image bytes of ``records`` stored in shards, by image id, each shard read once."""
    found: dict[int, bytes] = {}
    for url, group in by_shard(records).items():
        ids = {r.key: r.image_id for r in group}
        for key, members in read_pairs(url):
            if key in ids:
                found[ids[key]] = image_member(url, key, members)
    missing = [r for r in records if r.image_id not in found]
    if missing:
        raise DatasetFormatError(
            f"{missing[0].shard}: sample {missing[0].key!r} (and {len(missing) - 1} more) is "
            "no longer in its shard; expected the shards the index pass read"
        )
    return found
