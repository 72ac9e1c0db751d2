"""Training-step time of the Lightning system vs a bare PyTorch loop with the same towers and loss.

    python benchmarks/bench_train_step.py [--steps 30] [--repeats 2]

Both sides train the quick start's towers (resnet10t at 64 px, frozen MiniLM with remembered
features) on the same in-memory batches with AdamW and the warm-up/cosine schedule; the system side
also computes its step statistics, logs to TensorBoard and runs Lightning's loop. Runs alternate so
machine noise hits both; the median seconds per step and their ratio are printed (goal <= 1.10x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from goals import overall, verdict
from torch.utils.data import DataLoader

from adaptalign.lightning_modules.losses import info_nce
from adaptalign.lightning_modules.system import AlignmentModule

GOAL = 1.10
WORDS = [
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "star",
    "heart",
    "left",
    "right",
    "top",
    "bottom",
    "small",
    "large",
]


def make_batches(count: int, size: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(count):
        images = torch.randn(size, 3, 64, 64, generator=g)
        texts = [
            f"a {WORDS[(b + i) % 4]} {WORDS[4 + (b * 3 + i) % 4]} at the {WORDS[8 + i % 4]} {i}"
            for i in range(size)
        ]
        batches.append({"images": images, "texts": texts})
    return batches


def make_module() -> AlignmentModule:
    torch.manual_seed(0)
    return AlignmentModule(
        image_tower={"model_name": "resnet10t", "image_size": 64},
        text_tower={"model_name": "all-MiniLM-L6-v2", "freeze": True},
        embed_dim=256,
        lr=2e-3,
    )


class StepTimer(L.Callback):
    def __init__(self, skip: int) -> None:
        self.skip, self.start, self.end, self.steps = skip, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.skip:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()
        self.steps = batch_idx + 1 - self.skip


def loader(batches: list[dict]) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False)


def time_lightning(
    batches: list[dict],
    skip: int,
    callbacks: Sequence[L.Callback] = (),
    log_every_n_steps: int = 10,
) -> float:
    """Seconds per training step of the system in Lightning's loop, after ``skip`` steps."""
    module = make_module()
    timer = StepTimer(skip)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=1,
            limit_val_batches=0,
            default_root_dir=root,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=log_every_n_steps,
            callbacks=[*callbacks, timer],
        )
        trainer.fit(module, train_dataloaders=loader(batches))
    return (timer.end - timer.start) / timer.steps


def time_bare(batches: list[dict], skip: int) -> float:
    module = make_module().train()

    class Stub:  # configure_optimizers only reads the step count
        estimated_stepping_batches = len(batches)

    module.trainer = Stub()  # type: ignore[assignment]
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    start = 0.0
    for step, batch in enumerate(loader(batches)):
        if step == skip:
            start = time.perf_counter()
        image = F.normalize(module.image_tower(batch["images"]), dim=-1)
        text = F.normalize(module.text_tower(batch["texts"]), dim=-1)
        targets = torch.arange(image.shape[0])
        loss, _, _ = info_nce(image @ text.T, text @ image.T, targets, module.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return (time.perf_counter() - start) / (len(batches) - skip)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = 5  # first steps pay for allocation and the frozen text features
    batches = make_batches(args.steps + skip, args.batch_size)
    system, bare = [], []
    for r in range(args.repeats):
        bare.append(time_bare(batches, skip))
        system.append(time_lightning(batches, skip))
        print(f"repeat {r + 1}: bare {bare[-1]:.3f} s/step, system {system[-1]:.3f} s/step")
    s, b = statistics.median(system), statistics.median(bare)
    ratio = s / b
    print(f"\nmedian s/step  bare loop: {b:.3f}   system: {s:.3f}")
    print(f"ratio system / bare = {ratio:.3f}  (goal <= {GOAL:.2f}: {verdict(ratio <= GOAL)})")
    return overall({f"system / bare <= {GOAL:.2f}x": ratio <= GOAL})


if __name__ == "__main__":
    sys.exit(main())
