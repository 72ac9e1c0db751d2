"""A killed shard-by-shard feature extraction resumed vs one from scratch (goal: the resumed run
finishes in <= 0.6x the time of a whole extraction, with exactly the same features).

    python benchmarks/bench_extraction_resume.py [--images 512] [--shards 8] [--threads 2]

``--images`` pictures are written as WebDataset shards (``KEY.jpg`` + ``KEY.txt``) to a temporary
folder: Flickr8k's JPEGs from ../shared when present, else generated pictures. The frozen image
features of tf_efficientnet_lite0 (ImageNet weights from ../shared/weights when present, else
random ones; the time per image is the same) are extracted with ``extract_shard_features``:

* from scratch, in a process of its own;
* in a second process that is killed with SIGKILL once half the shards are complete (their chunk
  and manifest written), as a pre-empted job dies; then a third process resumes it.

Each process imports the libraries and builds the model first; the times are those of the
extraction alone, which is what a resume saves. Like the command line, the processes let idle
OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``). Other work on the cores slows the runs, and
not alike, so each one's CPU time (user + system of the process) and the machine's load average
are printed beside its wall time; the goal is judged on wall time.

The resumed run reads only the shards the killed one had not finished, so its time should be about
half of the whole one's, plus the shard lost to the kill. Same result: every row the resumed cache
holds equals the scratch cache's, bit for bit.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from goals import overall, verdict
from PIL import Image

from adaptalign.datamodules.feature_cache import FeatureCache
from adaptalign.datamodules.frozen_features import image_model_key
from adaptalign.datamodules.model_inputs import ModelInputs
from adaptalign.datamodules.shard_features import ShardFeatures, extract_shard_features
from adaptalign.lightning_modules.towers import ImageTower, ImageTowerConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IMAGES = SHARED / "data" / "flickr8k" / "Flickr8k_Dataset"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.pth"
GOAL = 0.6
PLAN = "plan.json"
# How often the killer looks for completed shards.
POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Measurement:
    images: int
    shards: int
    scratch_s: float
    scratch_cpu_s: float
    killed_after: int  # shards complete when the kill came
    resumed_s: float
    resumed_cpu_s: float
    resumed_shards: int  # shards the resumed run computed
    same: bool  # the resumed features equal the scratch ones


# ------------------------------------------------------------------------------ the data


def picture_bytes(count: int) -> tuple[list[bytes], str]:
    """``count`` JPEGs and where they came from."""
    if IMAGES.is_dir():
        files = sorted(IMAGES.glob("*.jpg"))[:count]
        if len(files) == count:
            return [f.read_bytes() for f in files], f"Flickr8k images from {IMAGES}"
    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(count):
        blobs = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        blobs.resize((224, 224), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
        pictures.append(buffer.getvalue())
    return pictures, f"generated pictures ({IMAGES} not found)"


def write_shards(folder: Path, pictures: list[bytes], shards: int) -> dict:
    """The pictures as ``shards`` tar shards of consecutive keys; the plan every process reads."""
    urls, keys = [], []
    per_shard = -(-len(pictures) // shards)
    for number in range(shards):
        url = str(folder / f"shard-{number:06d}.tar")
        shard_keys = []
        with wds.TarWriter(url) as writer:
            for index in range(number * per_shard, min(len(pictures), (number + 1) * per_shard)):
                key = f"{index:06d}"
                writer.write({"__key__": key, "jpg": pictures[index], "txt": f"picture {index}"})
                shard_keys.append(key)
        urls.append(url)
        keys.append(shard_keys)
    plan = {"urls": urls, "keys": keys}
    (folder / PLAN).write_text(json.dumps(plan))
    return plan


# ------------------------------------------------------------------------------ one extraction


def image_tower() -> ImageTower:
    torch.manual_seed(0)
    weights = str(WEIGHTS) if WEIGHTS.is_file() else None
    config = ImageTowerConfig("tf_efficientnet_lite0", checkpoint_path=weights, freeze=True)
    return ImageTower(config, embed_dim=256)


def complete_shards(cache_dir: Path) -> int:
    """Shards whose manifest is written: the last thing a shard's extraction does."""
    return len(list((cache_dir / "features" / "image").glob("*/shards/*.json")))


def extract(folder: Path, cache_dir: Path, threads: int) -> dict:
    """One extraction in this process (the child's work): its seconds and what it computed."""
    torch.set_num_threads(threads)
    plan = json.loads((folder / PLAN).read_text())
    tower = image_tower()
    inputs = ModelInputs(transform=tower.transform(), image_tower=tower)
    before = complete_shards(cache_dir)
    start, cpu = time.perf_counter(), time.process_time()
    extract_shard_features(
        plan["urls"], plan["keys"], inputs, FeatureCache(cache_dir), progress=False
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "load": os.getloadavg()[0],
        "computed": complete_shards(cache_dir) - before,
        "model_key": image_model_key(tower, inputs.transform),
    }


def child_command(folder: Path, cache_dir: Path, threads: int) -> list[str]:
    script = str(Path(__file__).resolve())
    return [
        sys.executable,
        script,
        "--child",
        str(folder),
        str(cache_dir),
        "--threads",
        str(threads),
    ]


def child_env() -> dict[str, str]:
    return {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}


def extract_in_child(folder: Path, cache_dir: Path, threads: int) -> dict:
    child = subprocess.run(
        child_command(folder, cache_dir, threads),
        check=True,
        capture_output=True,
        text=True,
        env=child_env(),
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def kill_at_half(folder: Path, cache_dir: Path, threads: int, shards: int) -> int:
    """Starts an extraction and SIGKILLs it once half the shards are complete; the number
    complete when it died (all of them when it ended first)."""
    child = subprocess.Popen(
        child_command(folder, cache_dir, threads),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=child_env(),
    )
    while child.poll() is None and complete_shards(cache_dir) < shards // 2:
        time.sleep(POLL_SECONDS)
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return complete_shards(cache_dir)


def same_features(plan: dict, model_key: str, first: Path, second: Path) -> bool:
    """Every shard's rows in both caches, compared exactly."""
    read = [
        ShardFeatures(FeatureCache(cache), model_key, plan["urls"], plan["keys"])
        for cache in (first, second)
    ]
    for url in plan["urls"]:
        a, b = (dict(features.read_shard(url)) for features in read)
        if a.keys() != b.keys():
            return False
        if any(not torch.equal(a[k]["image_features"], b[k]["image_features"]) for k in a):
            return False
    return True


def measure(args: argparse.Namespace, folder: Path) -> Measurement:
    pictures, source = picture_bytes(args.images)
    print(f"{len(pictures)} {source} in {args.shards} shards")
    plan = write_shards(folder, pictures, args.shards)
    scratch = extract_in_child(folder, folder / "scratch", args.threads)
    print(f"(load average {scratch['load']:.1f} at the end of the run from scratch)")
    killed_after = kill_at_half(folder, folder / "resumed", args.threads, args.shards)
    resumed = extract_in_child(folder, folder / "resumed", args.threads)
    print(f"(load average {resumed['load']:.1f} at the end of the resumed run)")
    same = same_features(plan, scratch["model_key"], folder / "scratch", folder / "resumed")
    return Measurement(
        images=len(pictures),
        shards=args.shards,
        scratch_s=scratch["seconds"],
        scratch_cpu_s=scratch["cpu_seconds"],
        killed_after=killed_after,
        resumed_s=resumed["seconds"],
        resumed_cpu_s=resumed["cpu_seconds"],
        resumed_shards=resumed["computed"],
        same=same,
    )


# ------------------------------------------------------------------------------ the verdict


def report(m: Measurement) -> int:
    ratio = m.resumed_s / m.scratch_s
    killed = m.killed_after < m.shards
    cpu_ratio = m.resumed_cpu_s / m.scratch_cpu_s
    print(f"from scratch: {m.shards} shards in {m.scratch_s:.1f} s (CPU {m.scratch_cpu_s:.1f} s)")
    print(f"killed      : SIGKILL with {m.killed_after} of {m.shards} shards complete")
    print(
        f"resumed     : {m.resumed_shards} shards in {m.resumed_s:.1f} s "
        f"(CPU {m.resumed_cpu_s:.1f} s)"
    )
    print(
        f"resumed / from scratch: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU "
        f"(goal <= {GOAL:.1f}x wall: {verdict(ratio <= GOAL)})"
    )
    print(f"resumed features == scratch features, all {m.images} images: {verdict(m.same)}")
    if not killed:
        print("the extraction ended before half its shards were seen complete: nothing to resume")
    return overall(
        {
            f"resumed <= {GOAL:.1f}x from scratch": ratio <= GOAL and killed,
            "same features": m.same,
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="default: the system's temporary folder")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(extract(Path(args.child[0]), Path(args.child[1]), args.threads)))
        return 0
    if args.shards < 2 or args.images < args.shards:
        parser.error("expected --shards >= 2 and at least one image per shard")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
        return report(measure(args, Path(folder)))


if __name__ == "__main__":
    sys.exit(main())
