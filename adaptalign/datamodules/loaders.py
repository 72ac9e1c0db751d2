"""The data module's loaders: training pairs (shuffled or by curriculum) and evaluation images.

Under several processes every loader comes sharded from here: the pair sampler and the curriculum
sampler shard the training data, and a ``DistributedSampler`` shards each evaluation split (as
Lightning's own would, but also with ``use_distributed_sampler: false``, which the curriculum
sampler needs). Lightning leaves samplers that are already distributed as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler

from adaptalign.datamodules.curriculum_sampler import CurriculumBatchSampler
from adaptalign.datamodules.datasets import (
    EvalImages,
    PairSampler,
    TrainPairs,
    collate_eval,
    collate_pairs,
)
from adaptalign.datamodules.resumable import ResumableDataLoader


def resumable_loader(
    dataset: TrainPairs,
    seed: int,
    num_workers: int,
    epoch_source: Callable[[], int] | None,
    **batching: object,
) -> ResumableDataLoader:
    """The training loader over ``dataset``, batched as ``batching`` says (DataLoader arguments).

    Its own random generator seeds the workers, so starting an iteration never draws from the
    global generator: a resumed run's dropout and other draws stay those of the run it continues.
    An iteration's epoch comes from ``epoch_source`` (the trainer's), which tells a resumed epoch
    from the next one even where a sampler's own epoch is not advanced (the curriculum sampler
    without its callback).
    """
    return ResumableDataLoader(
        dataset,
        num_workers=num_workers,
        collate_fn=collate_pairs,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        epoch_source=epoch_source,
        **batching,
    )


def pair_loader(
    dataset: TrainPairs,
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    num_workers: int = 0,
    epoch_source: Callable[[], int] | None = None,
) -> ResumableDataLoader:
    """Shuffled pairs, this process's share of them, in full batches."""
    sampler = PairSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return resumable_loader(
        dataset,
        seed,
        num_workers,
        epoch_source,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
    )


def curriculum_loader(
    dataset: TrainPairs,
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    min_pairs: int,
    epoch: int = 0,
    num_workers: int = 0,
    epoch_source: Callable[[], int] | None = None,
) -> ResumableDataLoader:
    """Batches from the curriculum sampler, which shards each global batch over the processes."""
    sampler = CurriculumBatchSampler(
        [r.objects for r in dataset.records],
        batch_size,
        num_replicas=world,
        rank=rank,
        seed=seed,
        min_pairs=min_pairs,
        epoch=epoch,
    )
    return resumable_loader(dataset, seed, num_workers, epoch_source, batch_sampler=sampler)


def eval_loader(
    dataset: EvalImages,
    batch_size: int,
    rank: int,
    world: int,
    num_workers: int = 0,
    shard: bool = True,
) -> DataLoader:
    """Each image once with all its captions; with ``shard``, this process's share of them.

    The padding duplicates a ``DistributedSampler`` adds are dropped by the retrieval metric.
    """
    sampler = None
    if shard and world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_eval,
    )
