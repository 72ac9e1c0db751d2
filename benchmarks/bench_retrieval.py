"""Speed and memory of ``RetrievalMetric`` at Karpathy-test scale, beside torchmetrics.

Run from the repository root: ``python benchmarks/bench_retrieval.py``.

Full size (default 5,000 images x 25,000 captions): the metric runs in a fresh child process so its
memory is not mixed with anything else. Reported:

* seconds: wall time of ``update`` + ``compute`` on a fresh metric, after a small warm-up run;
  median (and min) of ``--repeats`` runs;
* peak memory: the child's peak resident set size (``ru_maxrss``), which covers the interpreter,
  the torch libraries and the input embeddings as well as the metric, so it overstates the metric;
  the rise of that peak during the timed runs is printed beside it. The goal is checked on the
  whole-process peak, the conservative reading.

Comparison: torchmetrics' ``RetrievalHitRate`` needs one ``(pred, target, index)`` triple per
caption-image pair, 125 million at full size (about 1.7 GB for the flat inputs alone, before its
sort), so both run side by side in this process on a subset (default 1,000 images x 5,000
captions): text->image R@K must agree, and the time ratio is printed. The torchmetrics time
includes computing the similarity matrix it is fed; ``RetrievalMetric`` also ranks image->text and
computes median ranks in its time, which torchmetrics does not.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from goals import overall, verdict

from adaptalign.lightning_modules.retrieval import RetrievalMetric

GOAL_SECONDS = 2.0
GOAL_BYTES = 2.0e9
KS = (1, 5, 10)


def make_data(
    num_images: int, captions_per_image: int, dim: int, noise: float, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Unit embeddings; captions are noisy copies of their image, so recalls are not all 0."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(num_images, dim, generator=g), dim=1)
    image_ids = torch.arange(num_images)
    text_image_ids = image_ids.repeat_interleave(captions_per_image)
    text_ids = torch.arange(text_image_ids.numel())
    texts = images[text_image_ids] + noise * torch.randn(text_image_ids.numel(), dim, generator=g)
    return images, image_ids, F.normalize(texts, dim=1), text_ids, text_image_ids


def run_metric(data: tuple[Tensor, ...], chunk_size: int) -> tuple[float, dict[str, Tensor]]:
    """Seconds for one fresh metric's update + compute, and its result."""
    metric = RetrievalMetric(ks=KS, chunk_size=chunk_size)
    start = time.perf_counter()
    metric.update(*data)
    result = metric.compute()
    return time.perf_counter() - start, result


def run_torchmetrics(data: tuple[Tensor, ...]) -> tuple[float, dict[int, float]]:
    """Seconds for text->image R@K through RetrievalHitRate (similarity included), in percent."""
    from torchmetrics.retrieval import RetrievalHitRate

    images, _, texts, _, text_image_ids = data
    start = time.perf_counter()
    sim = texts @ images.T  # one query (row) per caption; image ids are row positions here
    preds = sim.reshape(-1)
    target = (text_image_ids[:, None] == torch.arange(images.shape[0])[None, :]).reshape(-1)
    indexes = torch.arange(texts.shape[0]).repeat_interleave(images.shape[0])
    recalls = {}
    for k in KS:
        metric = RetrievalHitRate(top_k=k)
        metric.update(preds, target, indexes)
        recalls[k] = 100.0 * float(metric.compute())
    return time.perf_counter() - start, recalls


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> None:
    """Child process: time the metric at full size and report peak RSS as one JSON line."""
    torch.set_num_threads(args.threads)
    data = make_data(args.images, args.captions_per_image, args.dim, args.noise, args.seed)
    run_metric(make_data(200, args.captions_per_image, args.dim, args.noise, 1), args.chunk_size)
    before = peak_rss_bytes()
    times, result = [], {}
    for _ in range(args.repeats):
        seconds, result = run_metric(data, args.chunk_size)
        times.append(seconds)
    report = {
        "times": times,
        "peak_rss": peak_rss_bytes(),
        "peak_rss_before": before,
        "result": {k: float(v) for k, v in result.items()},
    }
    print(json.dumps(report))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--noise", type=float, default=0.3, help="caption noise per dimension")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-images", type=int, default=1000, help="subset for torchmetrics")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure_in_child(argv: list[str]) -> dict:
    """The full-size timing, run by :func:`worker` in a fresh process so its memory is its own."""
    child = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", *argv],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    torch.set_num_threads(args.threads)
    num_texts = args.images * args.captions_per_image
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; dim {args.dim}, "
        f"chunk_size {args.chunk_size}, {args.repeats} repeats"
    )

    report = measure_in_child(argv)
    median_s, min_s = statistics.median(report["times"]), min(report["times"])
    peak, rise = report["peak_rss"], report["peak_rss"] - report["peak_rss_before"]
    ok_time, ok_mem = median_s <= GOAL_SECONDS, peak <= GOAL_BYTES
    print(f"\nRetrievalMetric, {args.images} images x {num_texts} captions (fresh process)")
    print(
        f"  time  median {median_s:.3f} s (min {min_s:.3f} s)   goal <= {GOAL_SECONDS:.0f} s   "
        f"{verdict(ok_time)}"
    )
    print(
        f"  peak RSS of the whole process {peak / 1e9:.3f} GB   "
        f"goal <= {GOAL_BYTES / 1e9:.0f} GB   {verdict(ok_mem)}"
    )
    print(
        f"    (peak {report['peak_rss_before'] / 1e9:.3f} GB before the timed runs: libraries, "
        f"data, warm-up; rise during them {rise / 1e6:.0f} MB)"
    )
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in report["result"].items()))

    sub = make_data(
        args.compare_images, args.captions_per_image, args.dim, args.noise, args.seed + 1
    )
    sub_texts = sub[2].shape[0]
    warm = make_data(50, args.captions_per_image, args.dim, args.noise, 1)
    run_metric(warm, args.chunk_size)  # first calls pay one-off setup; keep it out of both timings
    run_torchmetrics(warm)
    ours_times, tm_times, ours, theirs = [], [], {}, {}
    for _ in range(args.repeats):
        seconds, ours = run_metric(sub, args.chunk_size)
        ours_times.append(seconds)
        seconds, theirs = run_torchmetrics(sub)
        tm_times.append(seconds)
    ours_s, tm_s = statistics.median(ours_times), statistics.median(tm_times)
    print(f"\nSubset {args.compare_images} images x {sub_texts} captions, same process")
    print(f"  RetrievalMetric (both directions, R@K + medr)   {ours_s:.3f} s")
    print(f"  torchmetrics RetrievalHitRate (t2i, 3 x top_k)  {tm_s:.3f} s")
    print(f"  time ratio torchmetrics / RetrievalMetric       {tm_s / ours_s:.1f}x")
    agree = True
    for k in KS:
        mine, other = float(ours[f"t2i_R@{k}"]), theirs[k]
        same = abs(mine - other) < 1e-3
        agree &= same
        print(f"  t2i R@{k}: {mine:.4f} vs {other:.4f}  {'same' if same else 'DIFFERENT'}")
    return overall(
        {
            f"time <= {GOAL_SECONDS:.0f} s": ok_time,
            f"peak memory <= {GOAL_BYTES / 1e9:.0f} GB": ok_mem,
            "same R@K as torchmetrics": agree,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
