"""A callback that records, on every rank and step, what the DDP test of the combined config checks.

Used on the command line (``--trainer.callbacks+=tests.helpers.ddp_probe.StepProbe``) from the
repository root. Each rank appends one JSON line per step to ``<out>/rank<r>.jsonl``:

- the controls in force (everything but the per-sample temperatures is a number all ranks must
  share), and how far the per-sample temperatures are from the MM-TS schedule's own values;
- this rank's loss (its rows against the gathered batch);
- the loss one process computes on the global batch: the gathered embeddings, every rank's batch
  concatenated and every rank's per-sample temperatures, through the system's own loss with the
  gather switched off.

The one-process loss is computed inside the step, as a zero-weight extra loss registered after the
methods' own, so it sees the embeddings the step used and the callbacks' state before their
``on_train_batch_end`` updates; callbacks' attributes are restored afterwards, so the run itself is
unchanged (the zero term adds exactly 0 to the loss and its gradient).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from unittest import mock

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from adaptalign.callbacks.temperature_schedule import TemperatureSchedule
from adaptalign.lightning_modules import system
from adaptalign.lightning_modules.controls import Controls, StepEmbeddings


def _number(value: object) -> object:
    if isinstance(value, Tensor):
        return value.tolist() if value.numel() > 1 else float(value)
    if isinstance(value, tuple):
        return [_number(v) for v in value]
    return value


def _all_ranks(value: object) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _concatenate(batches: list[dict]) -> dict:
    merged = {}
    for key, first in batches[0].items():
        if isinstance(first, Tensor):
            merged[key] = torch.cat([b[key] for b in batches])
        elif isinstance(first, list):
            merged[key] = [item for b in batches for item in b[key]]
    return merged


class StepProbe(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.record: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        controls: Controls = pl_module.controls
        schedule = next(c for c in trainer.callbacks if isinstance(c, TemperatureSchedule))
        expected = schedule.values(trainer.global_step, batch["cluster_size"])
        self.record = {
            "step": trainer.global_step,
            "shared": {
                "direction_weights": _number(controls.direction_weights),
                "loss_scale": _number(controls.loss_scale),
                "tower_grad_scale": _number(controls.tower_grad_scale),
                "margin": _number(controls.margin),
                "extra_loss_weights": {
                    name: _number(weight) for name, (weight, _) in controls.extra_losses.items()
                },
            },
            "temperature_error": float((controls.temperature - expected).abs().max()),
        }
        methods = dataclasses.replace(controls, extra_losses=dict(controls.extra_losses))

        def one_process(view: StepEmbeddings) -> Tensor:
            self.record["one_process_loss"] = self._one_process_loss(
                trainer, pl_module, view, methods
            )
            return view.image.new_zeros(())

        controls.add_extra_loss("ddp_probe", 0.0, one_process)

    @staticmethod
    def _one_process_loss(trainer, pl_module, view: StepEmbeddings, controls: Controls) -> float:
        batch = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in view.batch.items()}
        merged = _concatenate(_all_ranks(batch))
        temperatures = torch.cat(_all_ranks(controls.temperature.detach().cpu()))
        whole = dataclasses.replace(controls, temperature=temperatures)
        # Extra losses only read (what they learn goes back through the step's outputs), so
        # computing the loss a second time leaves every callback as it was.
        with torch.no_grad(), mock.patch.object(system, "gather_with_grad", lambda x: (x, 0)):
            loss = pl_module.contrastive_loss(
                view.all_image.detach(), view.all_text.detach(), merged, whole
            ).loss
        return float(loss)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args) -> None:
        """The running statistics each rank evaluates with (a sum per buffer, as a fingerprint)."""
        if batch_idx != 0 or trainer.sanity_checking:
            return
        norms = [m for m in pl_module.modules() if isinstance(m, _NormBase)]
        statistics = [float(m.running_mean.double().sum()) for m in norms]
        with open(self.out / f"rank{trainer.global_rank}_eval.jsonl", "a") as handle:
            handle.write(json.dumps({"epoch": trainer.current_epoch, "bn": statistics}) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["loss"] = float(outputs["loss"])
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(self.record) + "\n")
