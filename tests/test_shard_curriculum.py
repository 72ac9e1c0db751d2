"""The curriculum over a stream's buffer: full batches, each pair once, pure or diverse by share."""

from __future__ import annotations

import numpy as np
import pytest

from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.curriculum_sampler import batch_statistics
from adaptalign.datamodules.shard_curriculum import BufferCurriculum


def _items(objects: list[tuple[str, ...]]) -> list[dict]:
    return [{"key": f"{i:04d}", "objects": tags} for i, tags in enumerate(objects)]


def _batches(curriculum: BufferCurriculum, items: list[dict], size: int, seed: int = 0):
    return list(curriculum(iter(items), size, np.random.default_rng(seed)))


def _stats(batches: list[list[dict]]) -> dict[str, float]:
    tags = [item["objects"] for batch in batches for item in batch]
    positions, start = [], 0
    for batch in batches:
        positions.append(list(range(start, start + len(batch))))
        start += len(batch)
    return batch_statistics(positions, tags)


def test_every_full_batch_is_drawn_and_no_pair_twice() -> None:
    # 50 pairs in windows of 12, batches of 4: 12 full batches, the 2 pairs left over unused.
    items = _items([(f"o{i % 7}",) for i in range(50)])
    batches = _batches(BufferCurriculum(window=12, same_object_share=0.5), items, 4)
    keys = [item["key"] for batch in batches for item in batch]
    assert len(batches) == 50 // 4
    assert all(len(batch) == 4 for batch in batches)
    assert len(keys) == len(set(keys)) == 48


def test_a_share_of_one_makes_same_object_batches_from_the_window() -> None:
    # Each window of 8 holds 4 dogs and 4 cats: every batch of 4 can be one object.
    objects = [("dog",), ("cat",)] * 16
    batches = _batches(BufferCurriculum(window=8, same_object_share=1.0), _items(objects), 4)
    assert len(batches) == 8
    assert _stats(batches)["purity"] == 1.0


def test_a_share_of_zero_spreads_objects_over_the_batches() -> None:
    # 4 objects, 4 pairs each per window: diverse batches hold one pair of each.
    objects = [(f"o{i % 4}",) for i in range(32)]
    batches = _batches(BufferCurriculum(window=16, same_object_share=0.0), _items(objects), 4)
    assert _stats(batches)["diversity"] == 1.0
    assert _stats(batches)["purity"] == 0.25


def test_the_same_generator_draws_the_same_batches() -> None:
    items = _items([(f"o{i % 5}",) for i in range(40)])
    curriculum = BufferCurriculum(window=10, same_object_share=0.5)
    first = [[i["key"] for i in b] for b in _batches(curriculum, items, 5, seed=3)]
    again = [[i["key"] for i in b] for b in _batches(curriculum, items, 5, seed=3)]
    other = [[i["key"] for i in b] for b in _batches(curriculum, items, 5, seed=4)]
    assert first == again
    assert first != other


def test_a_window_smaller_than_a_batch_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"shuffle_buffer=3 is smaller than one batch"):
        _batches(BufferCurriculum(window=3), _items([("a",)] * 8), 4)


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_a_share_outside_zero_to_one_is_refused(share: float) -> None:
    with pytest.raises(ConfigurationError, match="same_object_share"):
        BufferCurriculum(window=8, same_object_share=share)
