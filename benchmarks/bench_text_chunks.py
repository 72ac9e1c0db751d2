"""A fine-tuned text tower's cost per chunk size: a training step and an evaluation pass.

    python benchmarks/bench_text_chunks.py [--batch 128] [--eval 1250] [--repeats 5] [--threads 1]

MiniLM (the offline copy) as the Flickr8k TOnICS configs fine-tune it: forward and backward of a
training batch of random captions, and the no-grad encoding of one evaluation batch (250 images'
1,250 captions). ``text_tower.chunk_size`` sorts captions by length and encodes them in chunks of
that many; ``None`` is one forward for all, padded to the longest caption. Uses the Flickr8k train
captions from ../shared when present, else the generated dataset's captions (and says so). Each
setting is timed in turn within every repeat, so the ratios come from the same conditions.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from bench_clustering import load_captions

from adaptalign.lightning_modules.towers import TextTower, TextTowerConfig

CHUNKS: tuple[int | None, ...] = (None, 64, 32, 16)


def seconds(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="training captions per step")
    parser.add_argument("--eval", type=int, default=1250, help="captions per evaluation batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads take a count of at least 1")
    torch.set_num_threads(args.threads)
    captions, source = load_captions(20_000)
    print(f"{source}; {args.threads} thread(s), {args.repeats} repeats, median seconds")

    towers = {size: TextTower(TextTowerConfig(chunk_size=size), embed_dim=256) for size in CHUNKS}
    state = towers[None].state_dict()
    for tower in towers.values():
        tower.load_state_dict(state)
    rng = random.Random(0)
    train: dict[int | None, list[float]] = {size: [] for size in CHUNKS}
    evaluate: dict[int | None, list[float]] = {size: [] for size in CHUNKS}

    def step(tower: TextTower, batch: list[str]) -> None:
        tower.train()
        tower(batch).sum().backward()
        tower.zero_grad(set_to_none=True)

    @torch.no_grad()
    def encode(tower: TextTower, batch: list[str]) -> None:
        tower.eval()
        tower(batch)

    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        batch = rng.sample(captions, args.batch)
        held_out = rng.sample(captions, args.eval)
        for size, tower in towers.items():
            took, took_eval = seconds(step, tower, batch), seconds(encode, tower, held_out)
            if repeat:
                train[size].append(took)
                evaluate[size].append(took_eval)

    print("| chunk_size | train step (s) | speed-up | eval pass (s) | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base_train, base_eval = statistics.median(train[None]), statistics.median(evaluate[None])
    for size in CHUNKS:
        t, e = statistics.median(train[size]), statistics.median(evaluate[size])
        print(f"| {size} | {t:.2f} | {base_train / t:.2f}x | {e:.2f} | {base_eval / e:.2f}x |")


if __name__ == "__main__":
    main()
