"""A frozen-tower training epoch on Flickr8k with the feature cache vs without it (goal >= 20x).

    python benchmarks/bench_feature_cache.py [--train-images 1000] [--threads 2]

Both sides train the Flickr8k base setting (frozen ImageNet tf_efficientnet_lite0 and frozen MiniLM,
trained projections) for one epoch over the same subset. Without the cache every step decodes JPEGs
and runs both frozen backbones; with it, steps read stored features. The cache entry is built first
(its one-time cost is printed, and is zero when an earlier run already built it). Uses
../shared/data/flickr8k and ../shared/weights when present; otherwise says so and uses the generated
dataset with a randomly initialised image tower.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch
from goals import overall, verdict

from adaptalign.callbacks.model_inputs import ModelInputsLink
from adaptalign.common.allocator import keep_freed_memory
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.lightning_modules.system import AlignmentModule

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENS = SHARED / "data" / "flickr8k" / "Flickr8k_text" / "Flickr8k.token.txt"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.pth"
GOAL = 20.0


class EpochTimer(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def build(
    args: argparse.Namespace, feature_cache: bool
) -> tuple[AlignmentModule, L.LightningDataModule]:
    real = TOKENS.is_file() and WEIGHTS.is_file()
    torch.manual_seed(0)
    module = AlignmentModule(
        image_tower={
            "model_name": "tf_efficientnet_lite0",
            "checkpoint_path": str(WEIGHTS) if real else None,
            "freeze": True,
        },
        text_tower={"model_name": "all-MiniLM-L6-v2", "freeze": True},
        embed_dim=256,
    )
    data = AlignmentDataModule(
        annotations=str(TOKENS) if real else None,
        train_images=args.train_images,
        feature_cache=feature_cache,
        batch_size=128,
        num_workers=args.workers,
        cache_dir=args.cache_dir,
    )
    return module, data


def epoch_seconds(args: argparse.Namespace, feature_cache: bool) -> tuple[float, float]:
    """(seconds of one training epoch, seconds spent before it preparing data and features)."""
    module, data = build(args, feature_cache)
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, ModelInputsLink()],
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    total = time.perf_counter() - start
    return timer.seconds, total - timer.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="default: $ADAPTALIGN_CACHE or ~/.cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the command line does: no page faults for large buffers at each step
    if not (TOKENS.is_file() and WEIGHTS.is_file()):
        print(f"{TOKENS} or {WEIGHTS} not found: using the generated dataset instead")
        args.train_images = min(args.train_images, 2000)
    cached, build_seconds = epoch_seconds(args, feature_cache=True)
    print(f"with cache   : epoch {cached:.2f} s  (entry prepared/loaded in {build_seconds:.1f} s)")
    uncached, _ = epoch_seconds(args, feature_cache=False)
    print(f"without cache: epoch {uncached:.2f} s")
    ratio = uncached / cached
    print(
        f"speed-up {ratio:.1f}x over {args.train_images} train images "
        f"(goal >= {GOAL:.0f}x: {verdict(ratio >= GOAL)})"
    )
    return overall({f"speed-up >= {GOAL:.0f}x": ratio >= GOAL})


if __name__ == "__main__":
    sys.exit(main())
