"""A run that collapses without a NaN is flagged; a learning one is not."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from adaptalign.callbacks.collapse_watch import CollapseWatch, chance_recall, chance_rsum
from adaptalign.callbacks.run_summary import RunSummary
from adaptalign.common.errors import CollapseWarning, ConfigurationError
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.lightning_cli.cli import trainer_defaults
from adaptalign.lightning_modules.controls import StepStatistics
from adaptalign.lightning_modules.retrieval import RetrievalMetric
from tests.helpers.builders import quiet_trainer, tiny_module


def test_chance_recall_matches_hand_computation() -> None:
    # 16 images with 5 captions each: a caption finds its image in the top K of 16 with K/16; an
    # image is found when one of its 5 captions is in the top K of 80: 1 - C(75, K) / C(80, K).
    for k in (1, 5, 10):
        i2t, t2i = chance_recall(k, 16, 80)
        assert t2i == pytest.approx(100 * k / 16)
        assert i2t == pytest.approx(100 * (1 - math.comb(75, k) / math.comb(80, k)))
    assert chance_recall(1, 16, 80)[0] == pytest.approx(100 * 5 / 80)
    assert chance_recall(20, 16, 80)[1] == 100.0  # more candidates asked for than exist
    expected = sum(
        100 * k / 16 + 100 * (1 - math.comb(75, k) / math.comb(80, k)) for k in (1, 5, 10)
    )
    assert chance_rsum((1, 5, 10), 16, 80) == pytest.approx(expected)
    with pytest.raises(ValueError, match="expected 1 <= images <= texts"):
        chance_recall(1, 0, 5)


@pytest.mark.slow
def test_chance_rsum_is_what_random_embeddings_score() -> None:
    """The metric's rsum on random embeddings, averaged over 300 draws, is the chance rsum."""
    g = torch.Generator().manual_seed(0)
    image_ids = torch.arange(16)
    text_image_ids = image_ids.repeat_interleave(5)
    rsums = []
    for _ in range(300):
        metric = RetrievalMetric()
        images = F.normalize(torch.randn(16, 8, generator=g), dim=1)
        texts = F.normalize(torch.randn(80, 8, generator=g), dim=1)
        metric.update(images, image_ids, texts, torch.arange(80), text_image_ids)
        rsums.append(float(metric.compute()["rsum"]))
    mean = sum(rsums) / len(rsums)
    spread = (sum((r - mean) ** 2 for r in rsums) / (len(rsums) - 1)) ** 0.5
    # within 3 standard errors (about 3.5 rsum here) of the formula's 184.1
    assert abs(mean - chance_rsum((1, 5, 10), 16, 80)) < 3 * spread / len(rsums) ** 0.5


def test_settings_are_checked_and_every_cli_run_watches() -> None:
    for bad in (0, -0.1, True, "0.1"):
        with pytest.raises(ConfigurationError, match=r"loss_tolerance=.*; expected a number > 0"):
            CollapseWatch(loss_tolerance=bad)
    assert any(isinstance(c, CollapseWatch) for c in trainer_defaults()["callbacks"])


def test_the_loss_check_reads_infonce_steps_only() -> None:
    """Max-margin row losses are hinges, not cross-entropies: log N says nothing about them."""
    rows = torch.full((4,), math.log(8.0))
    stats = StepStatistics(*(torch.zeros(2),) * 4, rows, rows, torch.full((4,), 0.07))
    watch = CollapseWatch()
    watch.on_train_batch_end(
        None, SimpleNamespace(criterion="max_margin"), {"statistics": stats}, {}, 0
    )
    assert watch.loss_gaps() is None
    watch.on_train_batch_end(
        None, SimpleNamespace(criterion="infonce"), {"statistics": stats}, {}, 0
    )
    # 4 rows on one process: N = 4, so a loss of log 8 is log 2 above chance
    assert watch.loss_gaps().tolist() == pytest.approx([math.log(2.0)])


def generated(train: int, val: int, batch_size: int) -> AlignmentDataModule:
    config = GeneratedConfig(num_train=train, num_val=val, num_test=8, image_size=32, max_objects=2)
    return AlignmentDataModule(generated=config, batch_size=batch_size)


def collapse_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, CollapseWarning)]


@pytest.mark.slow
def test_a_zeroed_projection_is_flagged_and_written_in_the_summary(
    tiny_text_model: str, tmp_path: Path, cache_dir: Path
) -> None:
    """Both projections at zero: every embedding is the zero vector, every similarity 0, the loss
    exactly log(batch size) and no gradient ever moves them; ties rank every query last."""
    L.seed_everything(0)
    module = tiny_module(tiny_text_model)
    for tower in (module.image_tower, module.text_tower):
        torch.nn.init.zeros_(tower.projection.weight)
        torch.nn.init.zeros_(tower.projection.bias)
    watch = CollapseWatch()
    summary = tmp_path / "summary.json"
    trainer = quiet_trainer(max_epochs=2, callbacks=[watch, RunSummary(str(summary))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, generated(train=32, val=16, batch_size=16))
    messages = collapse_warnings(caught)
    chance = chance_rsum((1, 5, 10), 16, 80)
    for epoch in (0, 1):
        assert (
            f"training may have collapsed: at every step of epoch {epoch} the InfoNCE loss "
            "stayed within 0.01 of log(batch size)"
        ) in "\n".join(messages)
        assert (
            f"validation rsum 0.0 at epoch {epoch} is at or below chance ({chance:.1f} for 16 "
            "images and 80 captions)"
        ) in "\n".join(messages)
    assert len(messages) == 4
    assert float(trainer.callback_metrics["collapse/flag"]) == 1.0
    assert abs(float(trainer.callback_metrics["collapse/loss_gap"])) < 1e-5

    written = json.loads(summary.read_text())
    assert written["collapsed"] is True
    assert [e["epoch"] for e in written["collapse_epochs"]] == [0, 1]
    first = written["collapse_epochs"][0]
    assert first["loss_at_chance"] and first["rsum_at_chance"] and first["rsum"] == 0.0
    assert first["chance_rsum"] == pytest.approx(chance)
    assert abs(first["loss_gap"]) < 1e-5


@pytest.mark.slow
def test_a_learning_run_is_not_flagged(
    tiny_text_model: str, tmp_path: Path, cache_dir: Path
) -> None:
    """Frozen towers and trained projections: the loss starts within 0.05 of log(batch size) (the
    projections' small random similarities), yet the run learns and nothing is flagged."""
    L.seed_everything(0)
    module = tiny_module(
        tiny_text_model, embed_dim=32, lr=1e-2, image={"freeze": True}, text={"freeze": True}
    )
    watch = CollapseWatch()
    summary = tmp_path / "summary.json"
    steps = []

    class Gaps(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            steps.append(watch.loss_gaps())

    trainer = quiet_trainer(max_epochs=3, callbacks=[Gaps(), watch, RunSummary(str(summary))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, generated(train=256, val=32, batch_size=32))
    assert collapse_warnings(caught) == []
    assert float(trainer.callback_metrics["collapse/flag"]) == 0.0
    chance = chance_rsum((1, 5, 10), 32, 160)
    assert float(trainer.callback_metrics["collapse/chance_rsum"]) == pytest.approx(chance)
    assert float(trainer.callback_metrics["val/rsum"]) > chance + 30  # it did learn
    assert 0.01 < float(steps[0].abs().max()) < 0.05  # near chance at first, not pinned there
    assert float(steps[-1].mean()) < -0.02  # then below chance
    written = json.loads(summary.read_text())
    assert written["collapsed"] is False and written["collapse_epochs"] == []


def test_flagged_epochs_travel_in_checkpoints() -> None:
    watch = CollapseWatch()
    watch.flagged, watch.last_flag = [{"epoch": 3, "loss_at_chance": True}], True
    resumed = CollapseWatch()
    resumed.load_state_dict(watch.state_dict())
    assert resumed.summary() == {
        "collapsed": True,
        "collapse_epochs": [{"epoch": 3, "loss_at_chance": True}],
    }
