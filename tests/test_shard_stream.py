"""The training stream over tar shards: the epoch plan, every pair once, bad samples, resuming."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.shard_stream import (
    ShardPairLoader,
    ShardPairs,
    plan_epoch,
    resume_point,
)

BAD = b"these bytes are not an image"


def png_bytes(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (shade, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, sizes: Sequence[int], bad: Iterable[str] = ()) -> list[list[str]]:
    """Shards ``shard-i.tar`` of ``sizes[i]`` pairs (``KEY.png`` + ``KEY.txt``); ``bad`` keys
    get bytes that are not an image (``KEY.jpg``). Returns each shard's keys."""
    bad = set(bad)
    keys = []
    for number, size in enumerate(sizes):
        shard_keys = [f"s{number}-{i:03d}" for i in range(size)]
        with wds.TarWriter(str(folder / f"shard-{number}.tar")) as writer:
            for i, key in enumerate(shard_keys):
                image = {"jpg": BAD} if key in bad else {"png": png_bytes(i)}
                writer.write({"__key__": key, **image, "txt": f"caption of {key}"})
        keys.append(shard_keys)
    return keys


def make_item(shard: str, key: str, members: dict[str, bytes], epoch: int) -> dict:
    """Decodes the image, as a real item maker would, and keeps only the key."""
    data = members.get("png", members.get("jpg", b""))
    try:
        Image.open(io.BytesIO(data)).load()
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetFormatError(f"{shard}: sample '{key}': not a readable image") from exc
    return {"key": key}


def collate(items: list[dict]) -> dict:
    return {"keys": [item["key"] for item in items]}


def stream(folder: Path, keys: list[list[str]], **settings: object) -> ShardPairs:
    urls = [str(folder / f"shard-{i}.tar") for i in range(len(keys))]
    options = {"batch_size": 2, "shuffle_buffer": 3, "seed": 7, **settings}
    return ShardPairs(urls, keys, make_item, collate, **options)  # type: ignore[arg-type]


def epoch_keys(
    dataset: ShardPairs, epoch: int, workers: int, state: dict | None = None
) -> list[list[str]]:
    loader = ShardPairLoader(dataset, num_workers=workers, epoch_source=lambda: epoch)
    if state is not None:
        loader.load_state_dict(state)
    return [batch["keys"] for batch in loader]


# ---------------------------------------------------------------------------------- the plan
def test_plan_slots_are_disjoint_and_cover_every_shard() -> None:
    counts = list(np.random.default_rng(0).integers(1, 40, size=23))
    for world, workers in ((1, 0), (2, 2), (3, 4)):
        plan = plan_epoch(counts, world, workers, batch_size=4, seed=0, epoch=1)
        dealt = [shard for slot in plan.slots for shard in slot.shards]
        assert sorted(dealt) == list(range(len(counts)))
        assert len(plan.slots) == world * max(workers, 1)
        for slot in plan.slots:
            assert slot.pairs == sum(counts[s] for s in slot.shards)


def test_plan_balances_pair_counts_by_whole_shards() -> None:
    # 10+6 | 8+4+2+2 with one rank and two workers: both 16 pairs, 4 batches of 4 each
    plan = plan_epoch([10, 8, 6, 4, 2, 2], world=1, workers=2, batch_size=4, seed=0, epoch=0)
    assert sorted(slot.pairs for slot in plan.slots) == [16, 16]
    assert [slot.batches for slot in plan.slots] == [4, 4]
    assert (plan.pairs_trained, plan.pairs_left) == (32, 0)


def test_plan_gives_every_rank_the_same_batches_with_uneven_shards() -> None:
    counts = [50, 9, 9, 6, 6, 1]  # the rank with the 50-pair shard has batches to spare
    plan = plan_epoch(counts, world=2, workers=2, batch_size=4, seed=3, epoch=2)
    per_rank = [sum(plan.rank_caps(rank)) for rank in range(2)]
    assert per_rank == [plan.batches_per_rank] * 2
    assert plan.left_by_rank_equalisation > 0
    assert plan.pairs_trained == 2 * plan.batches_per_rank * 4
    assert plan.pairs_in_use == sum(counts) == plan.pairs_trained + plan.pairs_left
    for slot in plan.slots:
        assert slot.batches <= slot.pairs // 4


def test_plan_depends_on_seed_and_epoch_only() -> None:
    counts = [100 + i for i in range(12)]
    plans = [plan_epoch(counts, 2, 2, 8, seed=0, epoch=e) for e in (0, 0, 1)]
    assert plans[0] == plans[1]
    assert [s.shards for s in plans[0].slots] != [s.shards for s in plans[2].slots]


def test_plan_refuses_a_rank_without_a_batch() -> None:
    with pytest.raises(ConfigurationError, match="fewer shards than ranks x workers") as info:
        plan_epoch([40], world=2, workers=0, batch_size=4, seed=0, epoch=0)
    assert "data.shards" in str(info.value) and "data.batch_size=4" in str(info.value)
    with pytest.raises(ConfigurationError, match=r"data\.batch_size=8") as info:
        plan_epoch([3, 3, 3, 3], world=2, workers=0, batch_size=8, seed=0, epoch=0)
    assert "fewer shards" not in str(info.value)


def test_fewer_shards_than_slots_is_fine_while_every_rank_has_a_batch() -> None:
    plan = plan_epoch([8, 8], world=2, workers=2, batch_size=4, seed=0, epoch=0)
    assert plan.batches_per_rank == 2
    assert sorted(slot.batches for slot in plan.slots) == [0, 0, 2, 2]


def test_resume_point_follows_the_loaders_turns() -> None:
    # turns: w0 w1 w2 | w0 w1 w2 | w0 w2 | w2 (worker 1 has 2 batches, worker 0 has 3)
    assert resume_point([3, 2, 4], 0) == ([0, 0, 0], 0)
    assert resume_point([3, 2, 4], 4) == ([2, 1, 1], 1)
    assert resume_point([3, 2, 4], 6) == ([2, 2, 2], 0)
    assert resume_point([3, 2, 4], 7) == ([3, 2, 2], 1)  # worker 1 has ended: no matter
    assert resume_point([3, 2, 4], 9) == ([3, 2, 4], 0)


# -------------------------------------------------------------------------------- the stream
def test_every_pair_once_per_epoch_across_two_ranks_with_two_workers(tmp_path: Path) -> None:
    keys = write_shards(tmp_path, [4] * 8)  # 32 pairs: 2 shards, 4 batches per slot
    seen: list[str] = []
    for rank in (0, 1):
        dataset = stream(tmp_path, keys, rank=rank, world=2)
        batches = epoch_keys(dataset, epoch=0, workers=2)
        assert len(batches) == 8 == len(ShardPairLoader(dataset, num_workers=2))
        seen.extend(key for batch in batches for key in batch)
    assert sorted(seen) == sorted(key for shard in keys for key in shard)


def test_same_seed_and_epoch_same_order_another_epoch_another(tmp_path: Path) -> None:
    keys = write_shards(tmp_path, [6, 6, 6])
    first = epoch_keys(stream(tmp_path, keys), epoch=1, workers=0)
    again = epoch_keys(stream(tmp_path, keys), epoch=1, workers=0)
    other = epoch_keys(stream(tmp_path, keys), epoch=2, workers=0)
    assert first == again
    assert first != other
    flat = sorted(key for batch in first for key in batch)
    assert flat == sorted(key for batch in other for key in batch)  # 18 pairs, 9 batches each


def test_keys_not_in_use_are_passed_over(tmp_path: Path) -> None:
    keys = write_shards(tmp_path, [6, 6], bad=["s0-001"])
    in_use = [[k for k in keys[0] if k != "s0-001"][:4], keys[1][:4]]  # the bad one is not used
    batches = epoch_keys(stream(tmp_path, in_use), epoch=0, workers=0)
    assert sorted(k for batch in batches for k in batch) == sorted(in_use[0] + in_use[1])


def test_a_bad_sample_is_counted_and_skipped_with_skip_bad(tmp_path: Path) -> None:
    keys = write_shards(tmp_path, [5, 4], bad=["s0-002"])  # 9 pairs, 4 batches, 1 spare
    loader = ShardPairLoader(stream(tmp_path, keys, skip_bad=True), epoch_source=lambda: 0)
    batches = list(loader)
    seen = [key for batch in batches for key in batch["keys"]]
    assert len(batches) == 4 and "s0-002" not in seen and len(set(seen)) == 8
    assert sum(int(batch["stream_bad"]) for batch in batches) == 1
    assert sum(int(batch["stream_repeated"]) for batch in batches) == 0


# A DataLoader takes 5 s to shut down a worker whose stream raised: slow with a worker.
@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_bad_sample_stops_the_epoch_with_its_one_line_without_skip_bad(
    tmp_path: Path, workers: int
) -> None:
    keys = write_shards(tmp_path, [4, 4], bad=["s1-003"])
    loader = ShardPairLoader(stream(tmp_path, keys), num_workers=workers, epoch_source=lambda: 0)
    with pytest.raises(DatasetFormatError, match="s1-003': not a readable image") as info:
        list(loader)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_a_slot_short_after_a_skip_is_filled_with_repeats(tmp_path: Path) -> None:
    keys = write_shards(tmp_path, [4, 4], bad=["s0-001"])  # 8 pairs, 4 batches, no spare
    batches = list(ShardPairLoader(stream(tmp_path, keys, skip_bad=True), epoch_source=lambda: 0))
    assert len(batches) == 4
    repeated = [int(batch["stream_repeated"]) for batch in batches]
    assert repeated == [0, 0, 0, 1]  # the 7th good pair and one pair already trained on
    last = batches[-1]["keys"]
    assert len(set(last)) == 2
    earlier = {key for batch in batches[:-1] for key in batch["keys"]}
    assert len(set(last) & earlier) == 1
    assert sum(int(batch["stream_bad"]) for batch in batches) == 1


# ------------------------------------------------------------------------------ resuming
@pytest.mark.parametrize(
    ("workers", "consumed"),
    [
        (0, 2),
        pytest.param(2, 1, marks=pytest.mark.slow),
        pytest.param(2, 4, marks=pytest.mark.slow),
    ],
)
def test_resume_leaves_out_exactly_the_batches_yielded(
    tmp_path: Path, workers: int, consumed: int
) -> None:
    # shards of 6, 2, 2 pairs: with two workers, one yields 3 batches and the other 2
    keys = write_shards(tmp_path, [6, 2, 2])
    whole = epoch_keys(stream(tmp_path, keys), epoch=3, workers=workers)
    assert len(whole) == 5

    interrupted = ShardPairLoader(
        stream(tmp_path, keys), num_workers=workers, epoch_source=lambda: 3
    )
    iterator = iter(interrupted)
    taken = [next(iterator)["keys"] for _ in range(consumed)]
    state = interrupted.state_dict()
    del iterator
    assert taken == whole[:consumed]
    assert state == {"epoch": 3, "batches": consumed}

    rest = epoch_keys(stream(tmp_path, keys), epoch=3, workers=workers, state=state)
    assert rest == whole[consumed:]


def test_a_saved_position_applies_to_its_own_epoch_only(tmp_path: Path) -> None:
    keys = write_shards(tmp_path, [4, 4])
    whole = epoch_keys(stream(tmp_path, keys), epoch=1, workers=0)
    state = {"epoch": 0, "batches": 2}  # the run saved at the end of epoch 0
    assert epoch_keys(stream(tmp_path, keys), epoch=1, workers=0, state=state) == whole
    with pytest.raises(ConfigurationError, match="'batches'"):
        ShardPairLoader(stream(tmp_path, keys)).load_state_dict({"epoch": 0, "batches": -1})


def test_the_loader_keeps_batching_and_workers_to_itself(tmp_path: Path) -> None:
    keys = write_shards(tmp_path, [4])
    with pytest.raises(TypeError, match="persistent_workers"):
        ShardPairLoader(stream(tmp_path, keys), num_workers=1, persistent_workers=True)


def test_a_resumed_epoch_replays_skips_and_repeats_alike(tmp_path: Path) -> None:
    keys = write_shards(tmp_path, [4, 4], bad=["s1-002"])
    whole = epoch_keys(stream(tmp_path, keys, skip_bad=True), epoch=0, workers=0)
    state = {"epoch": 0, "batches": 3}
    rest = epoch_keys(stream(tmp_path, keys, skip_bad=True), epoch=0, workers=0, state=state)
    assert rest == whole[3:]


def test_a_key_in_use_missing_from_its_shard_is_a_bad_sample(tmp_path: Path) -> None:
    keys = write_shards(tmp_path, [4, 4])
    in_use = [keys[0] + ["s0-999"], keys[1]]
    with pytest.raises(DatasetFormatError, match="'s0-999' is in the shard's index but not in"):
        epoch_keys(stream(tmp_path, in_use), epoch=0, workers=0)
    loader = ShardPairLoader(stream(tmp_path, in_use, skip_bad=True), epoch_source=lambda: 0)
    assert sum(int(batch["stream_bad"]) for batch in loader) == 1
