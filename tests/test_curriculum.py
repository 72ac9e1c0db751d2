"""Curriculum batches: diversity, purity, determinism, sharding, the schedule and a real fit.

The DDP worker processes import this module, so it imports only the sampler at the top; Lightning
and the towers (slow to import) come in through the ``curriculum`` fixture and the fit helper.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.curriculum_sampler import (
    CurriculumBatchSampler,
    batch_purity,
    batch_statistics,
)
from tests.helpers.distributed import run_distributed

if TYPE_CHECKING:
    import lightning as L

    from adaptalign.callbacks.curriculum import ObjectCurriculum
    from adaptalign.datamodules.datamodule import AlignmentDataModule


@pytest.fixture(scope="module")
def curriculum() -> ModuleType:
    from adaptalign.callbacks import curriculum as module

    return module


def long_tail_tags() -> list[tuple[str, ...]]:
    """12 objects with 30 down to 8 pairs, some with second objects, plus 20 untagged pairs."""
    tags: list[tuple[str, ...]] = []
    for k in range(12):
        for j in range(30 - 2 * k):
            second = (f"o{(k + 1) % 12}",) if j % 4 == 0 else ()
            tags.append((f"o{k}", *second))
    tags += [()] * 20
    order = torch.randperm(len(tags), generator=torch.Generator().manual_seed(0)).tolist()
    return [tags[i] for i in order]


def sampler(tags: list[tuple[str, ...]], **kwargs: object) -> CurriculumBatchSampler:
    settings = {"batch_size": 8, "seed": 1, **kwargs}
    return CurriculumBatchSampler(tags, **settings)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- sampler


def test_diverse_batches_repeat_no_object_while_others_remain() -> None:
    tags = [(f"o{k}",) for k in range(12) for _ in range(20 - k)]  # 12 objects, 20 to 9 pairs
    s = sampler(tags, same_object_share=0.0)
    unused = Counter(t[0] for t in tags)
    batches = s.global_batches()
    assert len(batches) == len(tags) // 8
    for batch in batches:
        objects = [tags[i][0] for i in batch]
        remaining = sum(1 for n in unused.values() if n > 0)
        assert len(set(objects)) == min(8, remaining), (objects, unused)
        unused.subtract(objects)
    assert batch_statistics(batches, tags)["diversity"] > 0.95


def test_same_object_batches_are_pure_when_objects_have_enough_pairs() -> None:
    tags = [(f"o{k}",) for k in range(5) for _ in range(16)]  # each object fills two batches
    tags += [("o9", "o0")] * 3  # pairs showing o0 in second place, and o9 first
    s = sampler(tags, same_object_share=1.0)
    batches = s.global_batches()
    assert len(batches) == 10
    assert all(len({tags[i][0] for i in b}) == 1 for b in batches)
    assert batch_statistics(batches, tags)["purity"] == 1.0


def test_same_object_batch_fills_with_pairs_showing_the_object_then_diverse() -> None:
    tags = [("dog",)] * 5 + [("man", "dog"), ("boy", "dog")] + [(f"x{k}",) for k in range(9)]
    s = sampler(tags, same_object_share=1.0, seed=0)
    first = [tags[i] for i in s.global_batches()[0]]  # dog: the only object with 2 pairs
    assert first.count(("dog",)) == 5
    assert sorted(t for t in first if t[1:] == ("dog",)) == [("boy", "dog"), ("man", "dog")]
    assert len([t for t in first if t[0].startswith("x")]) == 1  # then one diverse pair
    assert batch_purity(first) == 7 / 8


def test_untagged_pairs_only_in_diverse_batches_when_objects_fill_their_batches() -> None:
    tags = [(f"o{k}",) for k in range(3) for _ in range(16)] + [()] * 16
    batches = sampler(tags, same_object_share=1.0).global_batches()
    pure = [b for b in batches if len({tags[i] for i in b}) == 1 and tags[b[0]]]
    assert len(pure) == 6
    assert all(not tags[i] for b in batches if b not in pure for i in b)


def test_min_pairs_keeps_small_objects_out_of_same_object_batches() -> None:
    tags = [("small",)] * 6 + [(f"x{k}",) for k in range(26)]  # x objects have one pair each
    counts = {
        min_pairs: [
            sum(tags[i] == ("small",) for i in b)
            for b in sampler(tags, same_object_share=1.0, min_pairs=min_pairs).global_batches()
        ]
        for min_pairs in (1, 7)
    }
    assert counts[1][0] == 6  # a same-object batch of all six
    assert max(counts[7][:3]) <= 1  # only diverse batches, while other objects remain


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_each_pair_at_most_once_per_epoch(share: float) -> None:
    tags = long_tail_tags()
    s = sampler(tags, same_object_share=share, batch_size=6)
    for epoch in (0, 1):
        used = [i for b in s.global_batches(epoch) for i in b]
        assert len(used) == len(s) * 6 == (len(tags) // 6) * 6
        assert len(set(used)) == len(used)


def test_without_drop_last_every_pair_is_used_and_batches_stay_full() -> None:
    tags = long_tail_tags()  # 248 pairs: 31 batches of 8, the last padded
    s = sampler(tags, same_object_share=0.5, drop_last=False, batch_size=5, num_replicas=2)
    batches = s.global_batches()
    assert len(batches) == len(s) == 25
    assert all(len(b) == 10 and len(set(b)) == 10 for b in batches)
    assert {i for b in batches for i in b} == set(range(len(tags)))


def test_share_moves_diversity_and_purity() -> None:
    tags = long_tail_tags()
    stats = {
        share: batch_statistics(sampler(tags, same_object_share=share).global_batches(), tags)
        for share in (0.0, 0.5, 1.0)
    }
    assert stats[0.0]["diversity"] > stats[0.5]["diversity"] > stats[1.0]["diversity"]
    assert stats[0.0]["purity"] < stats[0.5]["purity"] < stats[1.0]["purity"]
    assert stats[1.0]["purity"] > 0.85 and stats[0.0]["purity"] < 0.3


def test_deterministic_for_seed_and_epoch() -> None:
    tags = long_tail_tags()
    a = sampler(tags, same_object_share=0.5)
    b = sampler(tags, same_object_share=0.5)
    assert a.global_batches(3) == b.global_batches(3)
    assert a.global_batches(3) != a.global_batches(4)
    assert a.global_batches(3) != sampler(tags, same_object_share=0.5, seed=2).global_batches(3)
    b.set_epoch(3)
    keys = list(b)
    assert [[i for i, _ in batch] for batch in keys] == a.global_batches(3)
    assert {e for batch in keys for _, e in batch} == {3}


def test_rank_slices_partition_each_global_batch() -> None:
    tags = long_tail_tags()
    ranks = [
        sampler(tags, num_replicas=3, rank=r, batch_size=4, same_object_share=0.5)
        for r in (0, 1, 2)
    ]
    for s in ranks:
        s.set_epoch(2)
    per_rank = [list(s) for s in ranks]
    assert len({len(batches) for batches in per_rank}) == 1 and len(per_rank[0]) == len(tags) // 12
    for k, global_batch in enumerate(ranks[0].global_batches(2)):
        slices = [[i for i, _ in per_rank[r][k]] for r in range(3)]
        assert all(len(s) == 4 for s in slices)
        assert [i for part in slices for i in part] == global_batch


def test_batch_statistics_by_hand() -> None:
    tags = [("dog", "ball"), ("dog",), ("cat", "ball"), ("ball",), (), ()]
    stats = batch_statistics([[0, 1, 2, 3], [(2, 0), (4, 0), (5, 0)]], tags)
    # batch 1: primaries dog, dog, cat, ball -> 3/4; ball is shown by 3 of 4 pairs
    # batch 2: cat + two untagged -> 3/3 distinct; cat (or ball) shown by 1 of 3
    assert stats["batches"] == 2
    assert stats["diversity"] == pytest.approx((3 / 4 + 1) / 2)
    assert stats["purity"] == pytest.approx((3 / 4 + 1 / 3) / 2)
    assert batch_purity([(), ()]) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, r"batch_size=0; expected an integer >= 1"),
        ({"rank": 2, "num_replicas": 2}, r"rank=2; expected an integer from 0 to"),
        ({"min_pairs": 0}, r"min_pairs=0"),
        ({"same_object_share": 1.5}, r"same_object_share=1.5; expected a number from 0 to 1"),
        ({"same_object_share": float("nan")}, r"same_object_share=nan"),
        ({"batch_size": 30, "num_replicas": 2}, r"6 training pairs are fewer than one global"),
    ],
)
def test_bad_sampler_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        CurriculumBatchSampler([("a",)] * 6, **{"batch_size": 2, **kwargs})


def test_share_and_epoch_are_checked_when_set() -> None:
    s = sampler([("a",)] * 16)
    with pytest.raises(ConfigurationError, match=r"same_object_share=-0\.1"):
        s.same_object_share = -0.1
    with pytest.raises(ConfigurationError, match="epoch=-1"):
        s.set_epoch(-1)


def _ddp_sampler_work(rank: int, world: int, tags: list, out_dir: str) -> None:
    s = CurriculumBatchSampler(
        tags, batch_size=4, num_replicas=world, rank=rank, seed=5, same_object_share=0.5
    )
    mine = {}
    for epoch in (0, 1):
        s.set_epoch(epoch)
        mine[epoch] = list(s)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out_dir, "batches.json").write_text(json.dumps(gathered))


@pytest.mark.ddp
def test_ranks_under_ddp_cover_each_global_batch_once(tmp_path: Path) -> None:
    tags = long_tail_tags()
    run_distributed(_ddp_sampler_work, 2, tmp_path, tags, str(tmp_path))
    gathered = json.loads((tmp_path / "batches.json").read_text())
    reference = CurriculumBatchSampler(
        tags, batch_size=4, num_replicas=2, seed=5, same_object_share=0.5
    )
    for epoch in (0, 1):
        per_rank = [gathered[r][str(epoch)] for r in (0, 1)]
        assert len(per_rank[0]) == len(per_rank[1]) == len(reference) == len(tags) // 8
        for k, global_batch in enumerate(reference.global_batches(epoch)):
            first, second = ([i for i, e in per_rank[r][k] if e == epoch] for r in (0, 1))
            assert len(first) == len(second) == 4
            assert not set(first) & set(second)
            assert first + second == global_batch
        used = [i for r in (0, 1) for batch in per_rank[r] for i, _ in batch]
        assert len(used) == len(set(used))


# ------------------------------------------------------------------------------- schedule


def test_switch_schedule(curriculum: ModuleType) -> None:
    c = curriculum.ObjectCurriculum(
        schedule="switch", switch_epoch=2, start_share=0.1, end_share=0.9
    )
    assert [c.share(e) for e in range(5)] == [0.1, 0.1, 0.9, 0.9, 0.9]


def test_ramp_schedule_by_hand(curriculum: ModuleType) -> None:
    c = curriculum.ObjectCurriculum(schedule="ramp", ramp_epochs=5, start_share=0.2, end_share=1.0)
    assert [c.share(e) for e in range(7)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])
    assert curriculum.ObjectCurriculum(ramp_epochs=1, start_share=0.3).share(0) == 1.0
    down = curriculum.ObjectCurriculum(ramp_epochs=3, start_share=1.0, end_share=0.0)
    assert [down.share(e) for e in range(3)] == pytest.approx([1.0, 0.5, 0.0])


def test_ramp_length_defaults_to_max_epochs(curriculum: ModuleType) -> None:
    c = curriculum.ObjectCurriculum()
    with pytest.raises(ConfigurationError, match="ramp_epochs is unset"):
        c.share(0)
    c.on_fit_start(SimpleNamespace(max_epochs=3), None)  # type: ignore[arg-type]
    assert [c.share(e) for e in range(3)] == [0.0, 0.5, 1.0]
    with pytest.raises(ConfigurationError, match="needs ramp_epochs when the trainer has no max"):
        curriculum.ObjectCurriculum().on_fit_start(SimpleNamespace(max_epochs=-1), None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "cosine"}, r"schedule='cosine'; expected one of switch, ramp"),
        ({"switch_epoch": -1}, r"switch_epoch=-1; expected an integer >= 0"),
        ({"start_share": 1.2}, r"start_share=1.2; expected a number from 0 to 1"),
        ({"end_share": -0.5}, r"end_share=-0.5"),
        ({"ramp_epochs": 0}, r"ramp_epochs=0; expected an integer >= 1"),
    ],
)
def test_bad_curriculum_settings(curriculum: ModuleType, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        curriculum.ObjectCurriculum(**kwargs)


def test_state_keeps_the_resolved_ramp(curriculum: ModuleType) -> None:
    original = curriculum.ObjectCurriculum(start_share=0.2)
    original.on_fit_start(SimpleNamespace(max_epochs=5), None)  # type: ignore[arg-type]
    original.last_epoch = 2
    restored = curriculum.ObjectCurriculum(start_share=0.2)
    restored.load_state_dict(original.state_dict())
    restored.on_fit_start(SimpleNamespace(max_epochs=9), None)  # type: ignore[arg-type]
    assert restored.state_dict() == original.state_dict()
    assert [restored.share(e) for e in range(6)] == [original.share(e) for e in range(6)]


class FakeModule:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: float, **_: object) -> None:
        self.logged[name] = value


def fake_trainer(loader: object, epoch: int, callbacks: list) -> SimpleNamespace:
    return SimpleNamespace(
        train_dataloader=loader, current_epoch=epoch, max_epochs=4, callbacks=callbacks
    )


def test_epoch_start_sets_share_and_epoch_and_logs(curriculum: ModuleType) -> None:
    s = sampler(long_tail_tags())
    callback = curriculum.ObjectCurriculum(schedule="switch", switch_epoch=2, end_share=0.75)
    trainer = fake_trainer({"pairs": DataLoader(range(248), batch_sampler=s)}, 2, [callback])
    module = FakeModule()
    callback.on_train_epoch_start(trainer, module)
    assert (s.epoch, s.same_object_share) == (2, 0.75)
    assert module.logged == {"curriculum/same_object_share": 0.75}
    assert callback.state_dict()["last_epoch"] == 2


class Keys(torch.utils.data.Dataset):
    """A dataset whose items are the keys asked for, like ``TrainPairs`` takes them."""

    def __len__(self) -> int:
        return 248

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        return key


def test_a_loader_that_drew_before_the_run_started_is_refused(curriculum: ModuleType) -> None:
    """Batches planned with other settings would train the epoch: an error, not a warning."""
    s = sampler(long_tail_tags())
    loader = DataLoader(Keys(), batch_sampler=s, collate_fn=list)
    callback = curriculum.ObjectCurriculum(ramp_epochs=3)
    callback.on_train_start(fake_trainer(loader, 1, [callback]), FakeModule())  # nothing drawn
    assert (s.epoch, s.same_object_share, s.last_plan) == (1, 0.5, None)
    next(iter(loader))  # drawn with the settings it has: the plan the epoch should train on
    callback.on_train_start(fake_trainer(loader, 1, [callback]), FakeModule())
    assert s.last_plan == (1, 0.5)
    # a loader with workers draws when its iterator is created, before the epoch's settings
    with pytest.raises(
        ConfigurationError,
        match=r"drew batches \(epoch 1, same_object_share 0.5\) before epoch 2 \(share 1\) "
        r"started; ObjectCurriculum needs a training loader that starts drawing at its first",
    ):
        callback.on_train_start(fake_trainer(loader, 2, [callback]), FakeModule())


def test_a_loader_without_the_sampler_is_a_clear_error(curriculum: ModuleType) -> None:
    trainer = fake_trainer(DataLoader(range(8), batch_size=2), 0, [])
    with pytest.raises(
        ConfigurationError, match=r"found batch samplers: BatchSampler.*'curriculum'"
    ):
        curriculum.find_sampler(trainer)


# ------------------------------------------------------------------------------- real fit


def curriculum_fit(
    text_model: str,
    cache: Path,
    max_epochs: int,
    callback: ObjectCurriculum,
    callbacks: tuple[L.Callback, ...] = (),
    ckpt_path: str | None = None,
    num_workers: int = 0,
    **settings: object,
) -> tuple[AlignmentDataModule, dict[int, list[list[int]]], L.Trainer]:
    """A fit on the generated data batched by the curriculum sampler; the indices it trained on."""
    import lightning as L

    from adaptalign.datamodules.datamodule import AlignmentDataModule
    from adaptalign.datamodules.generated import GeneratedConfig
    from tests.helpers.builders import quiet_trainer, tiny_module

    trained: dict[int, list[list[int]]] = {}

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            trained.setdefault(trainer.current_epoch, []).append(batch["index"].tolist())

    data = AlignmentDataModule(
        generated=GeneratedConfig(num_train=48, num_val=8, num_test=8, image_size=32),
        cache_dir=str(cache),
        batch_size=8,
        num_workers=num_workers,
        sampler="curriculum",
    )
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        use_distributed_sampler=False,
        limit_val_batches=0,
        callbacks=[callback, Recorder(), *callbacks],
        **settings,
    )
    trainer.fit(tiny_module(text_model), data, ckpt_path=ckpt_path)
    return data, trained, trainer


def test_real_fit_follows_the_curriculum(
    curriculum: ModuleType, tiny_text_model: str, tmp_path: Path
) -> None:
    callback = curriculum.ObjectCurriculum(schedule="switch", switch_epoch=1)
    data, trained, trainer = curriculum_fit(tiny_text_model, tmp_path, 2, callback)
    tags = [r.objects for r in data.splits["train"]]  # the generated data's own shapes
    assert all(tags) and data.train_batch_sampler.same_object_share == 1.0
    for epoch in (0, 1):  # what trained is exactly the plan for that epoch and share
        assert trained[epoch] == data.train_batch_sampler.global_batches(
            epoch, callback.share(epoch)
        )
    assert len(trained[0]) == len(trained[1]) == 6
    diverse = batch_statistics(trained[0], tags)
    focused = batch_statistics(trained[1], tags)
    assert focused["purity"] > diverse["purity"] and diverse["diversity"] > focused["diversity"]
    unused = Counter(t[0] for t in tags)
    for batch in trained[0]:  # no shape repeats while other shapes still have unused pairs
        primaries = [tags[i][0] for i in batch]
        assert len(set(primaries)) == min(8, sum(1 for n in unused.values() if n > 0))
        unused.subtract(primaries)
    assert trainer.callback_metrics["curriculum/same_object_share"] == 1.0
    logged_purity = float(trainer.callback_metrics["curriculum/batch_purity_epoch"])
    assert logged_purity == pytest.approx(focused["purity"])
    assert callback.state_dict()["last_epoch"] == 1


@pytest.mark.slow
def test_resumed_fit_draws_the_same_batches(
    curriculum: ModuleType, tiny_text_model: str, tmp_path: Path
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_epochs: int, ckpt: str | None) -> tuple[dict, ObjectCurriculum]:
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
        callback = curriculum.ObjectCurriculum()  # ramps over the first run's max_epochs
        _, trained, _ = curriculum_fit(
            tiny_text_model,
            tmp_path / "cache",
            max_epochs,
            callback,
            callbacks=(checkpoints,),
            ckpt_path=ckpt,
            num_workers=1,  # a plain loader with a worker would draw before the epoch starts
            enable_checkpointing=True,
        )
        return trained, callback

    full, full_callback = run(2, None)
    assert [full_callback.share(e) for e in range(2)] == [0.0, 1.0]
    # one epoch longer: the restored ramp still ends at epoch 1 (a new one would be at 0.5 there)
    resumed, resumed_callback = run(3, str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    assert sorted(resumed) == [1, 2]
    assert resumed[1] == full[1] != resumed[2]
    assert resumed_callback.resolved_ramp_epochs == 2 and resumed_callback.share(2) == 1.0
