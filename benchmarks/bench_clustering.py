"""Caption clustering for MM-TS: encoding, k-means (k = 200) and the cached re-run.

    python benchmarks/bench_clustering.py [--captions 30000] [--clusters 200] [--threads 2]

Clusters the Flickr8k train captions (30,000) from ../shared/data/flickr8k when present; otherwise
says so and uses as many captions from the generated dataset's grammar. The first run goes into a
fresh, temporary cache (so it always encodes); the second run of the same call reads the cached
embeddings and labels, which is what every later training run on the same data pays.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from goals import overall, verdict

from adaptalign.datamodules import clusters
from adaptalign.datamodules.clusters import ClusterConfig, cluster_captions
from adaptalign.datamodules.feature_cache import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
TOKENS = ROOT.parent / "shared" / "data" / "flickr8k" / "Flickr8k_text" / "Flickr8k.token.txt"


def load_captions(count: int) -> tuple[list[str], str]:
    if TOKENS.is_file():
        from adaptalign.datamodules.formats import read_dataset

        records = read_dataset(str(TOKENS), format="flickr8k")
        captions = [c for r in records if r.split == "train" for c in r.captions]
        return captions[:count], f"Flickr8k train captions ({TOKENS})"
    print(f"{TOKENS} not found: using captions from the generated dataset's grammar instead")
    from adaptalign.datamodules import generated_scenes as g

    rng = np.random.default_rng(0)
    ranking = g.category_ranking(rng)
    captions: list[str] = []
    while len(captions) < count:
        captions += g.make_captions(rng, g.sample_scene(rng, 3, ranking, 1.1), 5)
    return captions[:count], "generated captions"


def timed(seconds: dict[str, float], name: str, fn: Callable) -> Callable:
    """Wraps a stage of the clustering so its own time is measured inside the full call."""

    def wrapper(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

    return wrapper


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=30_000)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    captions, source = load_captions(args.captions)
    distinct = len(set(captions))
    print(f"{len(captions)} {source}, {distinct} distinct; k = {args.clusters}")
    config = ClusterConfig(num_clusters=args.clusters)
    algorithm = clusters.resolve_backend(config.backend, len(captions))

    seconds: dict[str, float] = {}
    clusters.embed_captions = timed(seconds, "encode", clusters.embed_captions)
    clusters.run_kmeans = timed(seconds, "kmeans", clusters.run_kmeans)
    with tempfile.TemporaryDirectory() as folder:
        cache = FeatureCache(folder)
        start = time.perf_counter()
        first = cluster_captions(captions, config, cache, progress=True)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        again = cluster_captions(captions, config, cache, progress=False)
        warm = time.perf_counter() - start
    same = np.array_equal(first.labels, again.labels)
    print(f"cached labels equal the first run's: {verdict(same)}")
    report = clusters.cluster_size_report(first)
    rate = distinct / seconds["encode"]
    print(f"encoding    : {seconds['encode']:7.1f} s ({rate:.0f} distinct captions/s)")
    print(f"k-means     : {seconds['kmeans']:7.1f} s ({algorithm})")
    print(f"first run   : {cold:7.1f} s (model load, encoding, k-means, cache writes)")
    print(f"cached rerun: {warm:7.1f} s (model load and cache reads only)")
    print(f"speed-up of the cached re-run: {cold / warm:.0f}x")
    print(
        f"cluster sizes: min {report['min_size']}, median {report['median_size']:g}, "
        f"max {report['max_size']}; top decile holds {100 * report['top_decile_share']:.0f}%"
    )
    return overall({"the cached re-run gives the same labels": same})


if __name__ == "__main__":
    sys.exit(main())
