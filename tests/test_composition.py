"""All adaptive methods in one run through one config: the controls each step really carries."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from adaptalign.callbacks.arl import ARL
from adaptalign.callbacks.curriculum import ObjectCurriculum
from adaptalign.callbacks.loss_weighting import LossWeighting
from adaptalign.callbacks.temperature_schedule import TemperatureSchedule
from adaptalign.errors import ConfigurationError
from adaptalign.lightning_modules.cli import build_cli
from adaptalign.lightning_modules.controls import Controls

CONFIGS = Path(__file__).parents[1] / "configs"
TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


class ControlsProbe(L.Callback):
    """Records the controls each step consumed, with the batch's cluster sizes and epoch."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, Controls, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append((trainer.current_epoch, outputs["controls"], batch["cluster_size"]))


def test_combined_config_composes_all_four_methods(tiny_text_model: str, tmp_path: Path) -> None:
    args = [
        "--config",
        TINY,
        "--config",
        str(CONFIGS / "methods" / "combined.yaml"),
        f"--model.text_tower.model_name={tiny_text_model}",
        f"--data.clusters.text_model={tiny_text_model}",
        "--data.clusters.num_clusters=4",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=2",
    ]
    cli = build_cli(args, run=False)
    callbacks = {type(c): c for c in cli.trainer.callbacks}
    assert {TemperatureSchedule, LossWeighting, ObjectCurriculum, ARL} <= callbacks.keys()
    probe = ControlsProbe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, cli.datamodule)

    assert len(probe.steps) == 6  # 48 images / 16 per batch x 2 epochs
    schedule = callbacks[TemperatureSchedule]
    for step, (epoch, controls, sizes) in enumerate(probe.steps):
        # MM-TS: one temperature per sample, the schedule's own values.
        assert torch.allclose(controls.temperature.cpu(), schedule.values(step, sizes), atol=1e-6)
        # ARL: equal weights in its warm-up epoch, then its own weights; the bias term is there.
        arl_scale = controls.tower_grad_scale
        if epoch == 0:
            assert arl_scale == (1.5, 1.5)
        assert "arl_bias" in controls.extra_losses
    # Variance weighting: moves the direction weights once it has seen a step.
    weights = [tuple(float(w) for w in c.direction_weights) for _, c, _ in probe.steps]
    assert weights[0] == (1.0, 1.0) and any(w != (1.0, 1.0) for w in weights[1:])
    assert all(abs(sum(w) - 2.0) < 1e-5 for w in weights)  # no clipping at these signals
    # The curriculum drove the sampler: object-diverse first, same-object in the last epoch.
    sampler = cli.datamodule.train_batch_sampler
    assert sampler is not None and sampler.same_object_share == 1.0
    # After the warm-up, ARL's weights come from its statistics: unequal, summing to 1.
    later = [c.tower_grad_scale for e, c, _ in probe.steps if e == 1]
    assert all(abs(a + b - 3.0) < 1e-6 and a != b for a, b in later)


def test_two_writers_of_one_control_are_refused() -> None:
    controls = Controls()
    controls.add_extra_loss("x", 1.0, lambda view: torch.zeros(()))
    with pytest.raises(ConfigurationError, match="two callbacks add the extra loss 'x'"):
        controls.add_extra_loss("x", 1.0, lambda view: torch.zeros(()))
