"""Training pairs per second streamed from local WebDataset shards vs read from the image folder.

    python benchmarks/bench_shard_reading.py [--train-images 2000] [--workers 2] [--rounds 3]

Both sides are the data module's own training loader over the same images and captions, decoding
every JPEG and preprocessing it the same way (no trainer, no model: the data side alone), with the
same number of loader workers: the folder reader opens one file per pair in a shuffled order; the
stream reads whole shards (written first, untimed, by ``write_shards``, 8 of them) and shuffles
in a buffer. Each side reads one epoch per round, in turns, and its best round counts, so a burst
of other work on the machine hurts neither side alone. Goal: the stream keeps up with the folder
reader (>= 0.9x its pairs per second) on the machine's cores.

Uses ../shared/data/flickr8k when present (224x224 JPEGs); otherwise says so and uses the
generated dataset (64x64 PNGs).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from goals import overall, verdict

from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.shard_writer import write_shards

ROOT = Path(__file__).resolve().parents[1]
TOKENS = ROOT.parent / "shared" / "data" / "flickr8k" / "Flickr8k_text" / "Flickr8k.token.txt"
GOAL = 0.9
SHARDS = 8
BATCH = 64


def epoch_rate(data: AlignmentDataModule) -> tuple[float, int]:
    """(pairs per second, pairs) of one epoch of ``data``'s training loader."""
    loader = data.train_dataloader()
    pairs = 0
    start = time.perf_counter()
    for batch in loader:
        pairs += len(batch["index"])
    seconds = time.perf_counter() - start
    # Stop persistent workers here, before the other side's loader forks its own.
    data.train_loader = None
    del loader
    gc.collect()
    return pairs / seconds, pairs


def measure(args: argparse.Namespace) -> dict[str, float]:
    """The best pairs per second of each side over ``args.rounds`` rounds."""
    torch.set_num_threads(1)  # the loader workers are the work here
    real = TOKENS.is_file()
    if not real:
        print(f"{TOKENS} not found: using the generated dataset instead")
    with tempfile.TemporaryDirectory() as scratch:
        cache = args.cache_dir or str(Path(scratch) / "cache")
        common = {"batch_size": BATCH, "num_workers": args.workers, "cache_dir": cache}
        folder = AlignmentDataModule(
            annotations=str(TOKENS) if real else None,
            train_images=args.train_images,
            feature_cache=False,
            **common,
        )
        folder.setup()
        train, val = folder.splits["train"], folder.splits["val"][:BATCH]
        size = -(-len(train) // SHARDS)
        out = Path(scratch) / "shards"
        write_shards(train, out, "train", size, progress=False)
        write_shards(val, out, "val", len(val), progress=False)
        streamed = AlignmentDataModule(
            format="webdataset",
            shards=[str(p) for p in sorted(out.glob("train-*.tar"))],
            val_shards=[str(p) for p in sorted(out.glob("val-*.tar"))],
            shuffle_buffer=1000,
            **common,
        )
        streamed.setup()
        shard_bytes = sum(p.stat().st_size for p in out.glob("train-*.tar"))
        print(
            f"{len(train)} training images ({'Flickr8k' if real else 'generated'}), "
            f"{SHARDS} shards of {size} ({shard_bytes / 2**20:.0f} MiB), batch {BATCH}, "
            f"{args.workers} loader workers, {os.cpu_count()} cores"
        )
        best = {"folder": 0.0, "shards": 0.0}
        for round_ in range(args.rounds):
            for name, data in (("folder", folder), ("shards", streamed)):
                rate, pairs = epoch_rate(data)
                best[name] = max(best[name], rate)
                load = os.getloadavg()[0]
                said = f"{rate:7.1f} pairs/s ({pairs} pairs, load {load:.1f})"
                print(f"round {round_ + 1} {name:>6}: {said}")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-dir", default=None, help="default: a temporary folder")
    best = measure(parser.parse_args(argv))
    ratio = best["shards"] / best["folder"]
    print(
        f"best: folder {best['folder']:.1f} pairs/s, shards {best['shards']:.1f} pairs/s; "
        f"shards / folder {ratio:.2f}x (goal >= {GOAL}x: {verdict(ratio >= GOAL)})"
    )
    return overall({f"shards >= {GOAL}x the folder reader": ratio >= GOAL})


if __name__ == "__main__":
    sys.exit(main())
