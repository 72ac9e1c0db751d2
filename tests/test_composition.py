"""All adaptive methods in one run through one config: the controls each step really carries."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from adaptalign.callbacks.arl import ARL
from adaptalign.callbacks.curriculum import ObjectCurriculum
from adaptalign.callbacks.loss_weighting import LossWeighting
from adaptalign.callbacks.temperature_schedule import TemperatureSchedule
from adaptalign.cli import main
from adaptalign.common.errors import ConfigurationError
from adaptalign.lightning_cli.cli import build_cli
from adaptalign.lightning_modules.controls import Controls
from tests.helpers.builders import COMBINED_METHODS, final_validation

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


def combined_args(text_model: str, tmp_path: Path) -> list[str]:
    """The tiny config with all four methods, 2 epochs, 4 caption clusters from the tiny BERT."""
    return [
        "--config",
        TINY,
        *(arg for layer in COMBINED_METHODS for arg in ("--config", layer)),
        f"--model.text_tower.model_name={text_model}",
        f"--data.clusters.text_model={text_model}",
        "--data.clusters.num_clusters=4",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.max_epochs=2",
    ]


class ControlsProbe(L.Callback):
    """Records the controls each step consumed, with the batch's cluster sizes and epoch."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, Controls, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append((trainer.current_epoch, outputs["controls"], batch["cluster_size"]))
        self.losses.append(outputs["loss"].detach())


@pytest.mark.slow
def test_combined_config_composes_all_four_methods(tiny_text_model: str, tmp_path: Path) -> None:
    args = [*combined_args(tiny_text_model, tmp_path), f"--trainer.default_root_dir={tmp_path}"]
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


@pytest.mark.slow
def test_combined_config_trains_in_bf16_mixed_precision(
    tiny_text_model: str, tmp_path: Path
) -> None:
    """``configs/trainer/ddp_bf16.yaml``'s precision on CPU: towers in bfloat16, loss in float32."""
    args = [
        *combined_args(tiny_text_model, tmp_path),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.precision=bf16-mixed",
        "--trainer.log_every_n_steps=1",
    ]
    cli = build_cli(args, run=False)
    projected: list[torch.dtype] = []
    cli.model.image_tower.projection.register_forward_hook(
        lambda module, inputs, output: projected.append(output.dtype)
    )
    probe = ControlsProbe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, cli.datamodule)

    assert len(probe.losses) == 6 and set(projected) == {torch.bfloat16}
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in probe.losses)
    # The last step's mean temperature as the loss used it: MM-TS's values, not rounded.
    schedule = next(c for c in cli.trainer.callbacks if isinstance(c, TemperatureSchedule))
    last = schedule.values(len(probe.steps) - 1, probe.steps[-1][2]).mean()
    logged = cli.trainer.callback_metrics["train/temperature"]
    assert float(logged) == pytest.approx(float(last), rel=1e-6)
    assert math.isfinite(float(cli.trainer.callback_metrics["val/rsum"]))


def test_two_writers_of_one_control_are_refused() -> None:
    controls = Controls()
    controls.add_extra_loss("x", 1.0, lambda view: torch.zeros(()))
    with pytest.raises(ConfigurationError, match="two callbacks add the extra loss 'x'"):
        controls.add_extra_loss("x", 1.0, lambda view: torch.zeros(()))


@pytest.mark.ddp
def test_combined_config_under_two_process_ddp(tiny_text_model: str, tmp_path: Path) -> None:
    """All four methods on 2 CPU processes: what each rank did, step by step, and the results.

    ``tests.helpers.ddp_probe.StepProbe`` records on each rank the controls, this rank's loss and
    the loss of one process on the global batch; the run's final validation is then repeated on
    one process from its checkpoint.
    """
    # 3 global batches of 2 x 16 an epoch
    settings = [*combined_args(tiny_text_model, tmp_path), "--data.generated.num_train=96"]
    ddp_root = tmp_path / "ddp"
    probe = [
        "--trainer.callbacks+=tests.helpers.ddp_probe.StepProbe",
        f"--trainer.callbacks.out={ddp_root}",
    ]
    ddp = [
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        f"--trainer.default_root_dir={ddp_root}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "adaptalign", "fit", *settings, *ddp, *probe],
        cwd=ROOT,  # ``tests.helpers.ddp_probe`` imports from the repository root
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [
        [json.loads(line) for line in (ddp_root / f"rank{r}.jsonl").read_text().splitlines()]
        for r in range(2)
    ]
    assert [s["step"] for s in ranks[0]] == [s["step"] for s in ranks[1]] == list(range(6))
    for first, second in zip(*ranks, strict=True):
        step = first["step"]
        # Identical controls on both ranks, every step; the per-sample temperatures are the
        # schedule's values for each rank's own samples.
        assert first["shared"] == second["shared"], step
        # ARL's bias term weighs 1 in its warm-up epoch (steps 0-2), gamma = 4 after it.
        assert first["shared"]["extra_loss_weights"] == {"arl_bias": 1.0 if step < 3 else 4.0}
        assert max(first["temperature_error"], second["temperature_error"]) < 1e-6, step
        # DDP averages the ranks' gradients, so the loss it optimises is the ranks' mean; that is
        # the loss one process computes on the global batch.
        gathered = (first["loss"] + second["loss"]) / 2
        assert first["one_process_loss"] == pytest.approx(second["one_process_loss"], rel=1e-6)
        assert gathered == pytest.approx(first["one_process_loss"], rel=1e-5), step
    # Each process updated BatchNorm statistics from its own slice; evaluation uses process 0's.
    evaluated = [(ddp_root / f"rank{r}_eval.jsonl").read_text().splitlines() for r in range(2)]
    assert len(evaluated[0]) == 2 and evaluated[0] == evaluated[1]
    assert json.loads(evaluated[0][0])["bn"]  # the tiny image tower has BatchNorm layers
    # The methods really acted: ARL left its warm-up, the variance signal moved the weights.
    weights = [tuple(s["shared"]["direction_weights"]) for s in ranks[0]]
    assert weights[0] == (1.0, 1.0) and len(set(weights)) > 1
    scales = [tuple(s["shared"]["tower_grad_scale"]) for s in ranks[0]]
    assert scales[0] == (1.5, 1.5) and scales[-1][0] != scales[-1][1]

    # The checkpoint loads on one process, whose validation (written inside the evaluated run)
    # gives the run's final metrics.
    (ckpt,) = ddp_root.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    main(["validate", *settings, f"--ckpt_path={ckpt}"])
    distributed = final_validation(ddp_root / "lightning_logs" / "version_0")
    single = final_validation(ddp_root / "lightning_logs" / "version_0" / "validate" / "version_0")
    assert "val/rsum" in distributed and distributed.keys() == single.keys()
    for tag, (_, value) in distributed.items():
        assert single[tag][1] == pytest.approx(value, abs=1e-4), tag
