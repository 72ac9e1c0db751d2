"""MM-TS schedule values against hand computations, refusals, and the controls it writes."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from adaptalign.callbacks.temperature_schedule import (
    CosineTemperatureSchedule,
    TemperatureSchedule,
)
from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.clusters import ClusterConfig, tercile_bounds
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.generated import GeneratedConfig
from tests.helpers.builders import quiet_trainer, tiny_module


def schedule(**kwargs: object) -> TemperatureSchedule:
    s = TemperatureSchedule(total_steps=100, **kwargs)  # type: ignore[arg-type]
    s.size_range = (2, 10)
    return s


def test_base_cosine_by_hand() -> None:
    s = schedule(alpha=0.08, oscillations=5)  # period P = 100 / 5 = 20 steps
    assert s.base(0) == pytest.approx(0.04)
    assert s.base(5) == pytest.approx(0.0, abs=1e-12)  # a quarter period: cos(pi/2)
    assert s.base(10) == pytest.approx(-0.04)
    assert s.base(20) == pytest.approx(0.04)
    assert s.base(25) == pytest.approx(0.0, abs=1e-12)


def test_cluster_shift_and_per_sample_values_by_hand() -> None:
    s = schedule(alpha=0.08, oscillations=5, shift_min=0.05, shift_max=0.20)
    sizes = torch.tensor([2, 6, 10])  # smallest, middle, largest of the range (2, 10)
    assert s.shift(sizes).tolist() == pytest.approx([0.05, 0.125, 0.20])
    # step 10: base -0.04
    assert s.values(10, sizes).tolist() == pytest.approx([0.01, 0.085, 0.16])
    assert float(s.values(10, sizes).min()) > 0


def test_equal_cluster_sizes_give_every_sample_shift_min() -> None:
    """n_max = n_min makes the formula's fraction 0 / 0; every sample gets s_min instead."""
    s = schedule(alpha=0.08, oscillations=5, shift_min=0.05, shift_max=0.20)
    s.size_range = (4, 4)  # every cluster holds 4 captions
    sizes = torch.tensor([4, 4, 4])
    assert s.shift(sizes).tolist() == pytest.approx([0.05] * 3)
    assert s.values(10, sizes).tolist() == pytest.approx([0.01] * 3)  # base -0.04 + 0.05


def test_unimodal_schedule_by_hand() -> None:
    s = CosineTemperatureSchedule(t_min=0.1, t_max=1.0, oscillations=5, total_steps=100)
    sizes = torch.zeros(3)
    assert s.values(0, sizes).tolist() == pytest.approx([1.0] * 3)  # t_max at the start
    assert s.values(10, sizes).tolist() == pytest.approx([0.1] * 3)  # t_min at half a period
    assert s.values(5, sizes).tolist() == pytest.approx([0.55] * 3)


def test_margin_schedule_defaults() -> None:
    s = schedule(alpha=0.2, oscillations=5, shift_min=0.17, shift_max=0.30, target="margin")
    assert s.values(0, torch.tensor([2, 10])).tolist() == pytest.approx([0.27, 0.40])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.12, "shift_min": 0.05}, r"alpha/2=0.06 must be < shift_min=0.05"),
        ({"alpha": 0.1, "shift_min": 0.05}, r"alpha/2=0.05 must be < shift_min=0.05"),
        ({"shift_min": 0.2, "shift_max": 0.1}, r"shift_max=0.1 < shift_min=0.2"),
        ({"oscillations": 0}, r"oscillations=0; expected >= 1"),
    ],
)
def test_settings_that_could_reach_zero_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        TemperatureSchedule(**kwargs)


def test_unimodal_refuses_non_positive_bounds() -> None:
    with pytest.raises(ConfigurationError, match="expected 0 < t_min <= t_max"):
        CosineTemperatureSchedule(t_min=0.0, t_max=1.0)


def test_missing_cluster_sizes_is_a_clear_error() -> None:
    s = TemperatureSchedule(total_steps=10)
    with pytest.raises(ConfigurationError, match="needs the data's cluster sizes"):
        s.values(0, torch.tensor([3]))


def test_state_round_trip() -> None:
    s = schedule()
    restored = TemperatureSchedule()
    restored.load_state_dict(s.state_dict())
    sizes = torch.tensor([2, 7, 10])
    for step in (0, 13, 57):
        assert torch.equal(restored.values(step, sizes), s.values(step, sizes))


class Recorder(L.Callback):
    """What each step actually used: step, the batch's cluster sizes, per-sample temperatures."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the optimiser step this batch was trained at
        self.rows.append((step, batch["cluster_size"], outputs["statistics"].temperature))


@pytest.mark.slow
def test_per_sample_temperatures_reach_the_loss(tiny_text_model: str, tmp_path: Path) -> None:
    """Fit with clustered data: every step's temperatures are the schedule's for its batch."""
    data = AlignmentDataModule(
        generated=GeneratedConfig(num_train=48, num_val=8, num_test=8, image_size=32),
        cache_dir=str(tmp_path),
        clusters=ClusterConfig(num_clusters=6, text_model=tiny_text_model),
        batch_size=16,
    )
    module = tiny_module(tiny_text_model, learn_temperature=False)
    schedule = TemperatureSchedule(alpha=0.08, oscillations=2, shift_min=0.05, shift_max=0.2)
    recorder = Recorder()
    trainer = quiet_trainer(max_epochs=2, callbacks=[schedule, recorder])
    trainer.fit(module, data)
    assert schedule.total_steps == 6  # 48 / 16 batches x 2 epochs
    sizes = data.cluster_sizes
    assert schedule.size_range == (int(sizes.min()), int(sizes.max()))
    assert int(sizes.sum()) == 48 * 5  # every training caption is in one cluster
    assert len(recorder.rows) == 6
    low, high = schedule.size_range
    for step, batch_sizes, used in recorder.rows:
        base = 0.04 * math.cos(2 * math.pi * step / 3)  # period 6 / 2 = 3 steps
        expected = base + 0.05 + (batch_sizes.float() - low) / (high - low) * 0.15
        assert torch.allclose(used, expected, atol=1e-6), step
    assert len({round(float(u.std()), 6) for _, _, u in recorder.rows}) > 1  # really per sample


@pytest.mark.slow
def test_schedule_resumes_exactly_from_a_checkpoint(tiny_text_model: str, tmp_path: Path) -> None:
    def run(max_epochs: int, ckpt: str | None = None) -> tuple[Recorder, TemperatureSchedule]:
        data = AlignmentDataModule(
            generated=GeneratedConfig(num_train=48, num_val=8, num_test=8, image_size=32),
            cache_dir=str(tmp_path / "cache"),
            clusters=ClusterConfig(num_clusters=6, text_model=tiny_text_model),
            batch_size=16,
        )
        schedule = TemperatureSchedule(alpha=0.08, oscillations=2, shift_min=0.05, shift_max=0.2)
        recorder = Recorder()
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}"
        )
        quiet_trainer(
            max_epochs=max_epochs,
            enable_checkpointing=True,
            callbacks=[schedule, recorder, checkpoints],
        ).fit(tiny_module(tiny_text_model, learn_temperature=False), data, ckpt_path=ckpt)
        return recorder, schedule

    full, full_schedule = run(max_epochs=3)
    resumed, resumed_schedule = run(max_epochs=3, ckpt=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    assert resumed_schedule.state_dict() == full_schedule.state_dict()
    assert [step for step, _, _ in resumed.rows] == [3, 4, 5, 6, 7, 8]
    for (step, sizes, used), (step_r, sizes_r, used_r) in zip(
        full.rows[3:], resumed.rows, strict=True
    ):
        assert step == step_r and torch.equal(sizes, sizes_r)
        assert torch.allclose(used, used_r, atol=1e-7)


@pytest.mark.slow
def test_validation_reports_head_middle_tail_recall(tiny_text_model: str, tmp_path: Path) -> None:
    """Validation captions get their nearest training cluster and recall is split by tercile."""
    data = AlignmentDataModule(
        generated=GeneratedConfig(num_train=48, num_val=12, num_test=8, image_size=32),
        cache_dir=str(tmp_path),
        clusters=ClusterConfig(num_clusters=6, text_model=tiny_text_model),
        batch_size=16,
        eval_batch_size=5,
    )
    data.setup()
    clusters = data.caption_clusters
    assert clusters is not None
    val_ids = {r.image_id for r in data.splits["val"]}
    assert val_ids <= set(clusters.eval_buckets)
    batch = next(iter(data.val_dataloader()))
    assert batch["text_bucket"].shape == batch["text_id"].shape
    assert batch["image_bucket"].shape == batch["image_id"].shape
    # Each caption's bucket is the tercile of its assigned cluster's training size.
    tail_max, middle_max = tercile_bounds(data.cluster_sizes)
    sizes = torch.as_tensor(clusters.sizes)[batch["text_cluster"]]
    expected = (sizes > tail_max).long() + (sizes > middle_max).long()
    assert torch.equal(batch["text_bucket"], expected)

    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1)
    trainer.fit(tiny_module(tiny_text_model), data)
    metrics = trainer.callback_metrics
    assert "val/rsum" in metrics
    buckets = set(torch.cat([b["text_bucket"] for b in data.val_dataloader()]).tolist())
    names = ("tail", "middle", "head")
    for bucket in buckets:
        assert f"val/{names[bucket]}/t2i_R@1" in metrics
