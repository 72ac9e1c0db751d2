"""Partially unlocked towers on Flickr8k: a training epoch over the cached frozen prefix vs one that
recomputes it at every step (goals: >= 10x with the image tower's top unlocked, 1.3x text alone).

    python benchmarks/bench_prefix_cache.py [--train-images 1000] [--threads 2] [--cache-dir DIR]

Three modes, each trained for one epoch (batch 128, no validation) from the same seed, twice:

* image: the last block of tf_efficientnet_lite0 trains (``unlocked_blocks: 1``), MiniLM is frozen;
* text: the image tower is frozen, MiniLM's last 2 of 6 layers train (``unlocked_layers: 2``);
* both: both tops train.

``cached`` reads the frozen prefix's output (image feature maps, captions' hidden states, stored in
float16) from the feature cache, so a step runs only the unlocked top and the heads; ``recomputed``
gives the tower raw images / captions and runs its frozen prefix (no grad, eval mode) at every step.
The other tower is served from the cache on both sides. The cache is filled first, untimed (its
one-time cost is printed, zero when an earlier run filled it), so the timed cached epoch only reads.
Each timed epoch runs in its own process, so its peak resident memory (``ru_maxrss``) is its own;
like the command line, the processes let idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``) and
keep freed large buffers for reuse (``adaptalign.common.allocator``), without which recomputing
would also pay for page-faulting its activations in at every step.
The machine's load average is printed beside each run, since other work on the cores slows both
sides, and not alike: the goals are judged on wall time, with the epochs' CPU time (user + system of
the process; about the wall time when the run got one core's worth of the two) printed beside it.

Same result: the two routes compute the same function up to the float16 storage of the prefix.
Where no dropout trains (image), the epochs draw alike and their mean training losses are compared.
MiniLM's unlocked layers train with dropout, and the routes pad and group a batch's captions
differently on their way through them (captions tokenised in chunks sorted by characters, or cached
rows padded together), so their dropout masks differ; there the loss of the first batch with the
model in evaluation mode is compared (the epochs' losses are printed beside it). Tolerance: 1e-2
relative.

Uses ../shared/data/flickr8k and ../shared/weights when present; otherwise says so and uses the
generated dataset with a randomly initialised image tower.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from goals import overall, verdict

from adaptalign.callbacks.model_inputs import model_inputs
from adaptalign.common.allocator import keep_freed_memory
from adaptalign.datamodules.builder import feature_cache
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.frozen_features import (
    compute_frozen_features,
    image_model_key,
    text_prefix_key,
)
from adaptalign.datamodules.generated import default_cache_dir
from adaptalign.datamodules.model_inputs import ModelInputs
from adaptalign.lightning_modules.system import AlignmentModule

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENS = SHARED / "data" / "flickr8k" / "Flickr8k_text" / "Flickr8k.token.txt"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.pth"
BATCH = 128
SAME_RTOL = 1e-2


@dataclass(frozen=True)
class Mode:
    """Which tower tops train; those towers' prefixes are what the two sides cache or recompute."""

    image_blocks: int  # 0: the image tower is frozen
    text_layers: int  # 0: the text tower is frozen
    goal: float  # recomputed / cached epoch time

    @property
    def dropout(self) -> bool:
        """MiniLM's unlocked layers train with dropout: epochs of the two routes draw apart."""
        return self.text_layers > 0


MODES = {
    "image": Mode(image_blocks=1, text_layers=0, goal=10.0),
    "text": Mode(image_blocks=0, text_layers=2, goal=1.3),
    "both": Mode(image_blocks=1, text_layers=2, goal=10.0),
}
TEXT_LAYERS = 6  # all-MiniLM-L6-v2


def text_bound(layers: int, unlocked: int) -> float:
    """Compute bound of the text-only speed-up: recomputing adds the frozen layers' forward to a
    step that runs the unlocked layers forward and backward (about three forwards each)."""
    return (layers - unlocked + 3 * unlocked) / (3 * unlocked)


# ------------------------------------------------------------------------------ one run


def real_data() -> bool:
    return TOKENS.is_file() and WEIGHTS.is_file()


def build(args: argparse.Namespace, mode: Mode) -> tuple[AlignmentModule, AlignmentDataModule]:
    """The Flickr8k base setting with the mode's tops unlocked; the same weights for one seed."""
    real = real_data()
    L.seed_everything(args.seed, verbose=False)
    image = {
        "model_name": "tf_efficientnet_lite0",
        "checkpoint_path": str(WEIGHTS) if real else None,
    }
    image.update({"unlocked_blocks": mode.image_blocks} if mode.image_blocks else {"freeze": True})
    text: dict = {"model_name": "all-MiniLM-L6-v2"}
    text.update({"unlocked_layers": mode.text_layers} if mode.text_layers else {"freeze": True})
    module = AlignmentModule(image_tower=image, text_tower=text, embed_dim=256)
    data = AlignmentDataModule(
        annotations=str(TOKENS) if real else None,
        format="flickr8k" if real else "auto",
        train_images=args.train_images,
        batch_size=BATCH,
        num_workers=args.workers,
        cache_dir=args.cache_dir,
        seed=args.seed,
    )
    return module, data


def side_inputs(inputs: ModelInputs, mode: Mode, side: str) -> ModelInputs:
    """The system's inputs; ``recomputed`` leaves out the mode's prefixes, so those towers get
    raw inputs while the other tower stays cached."""
    if side == "cached":
        return inputs
    if mode.image_blocks:
        inputs = dataclasses.replace(inputs, image_tower=None)
    if mode.text_layers:
        inputs = dataclasses.replace(inputs, text_prefix=None)
    return inputs


class GivenInputs(L.Callback):
    """Hands the data module fixed inputs at setup (in place of ``ModelInputsLink``)."""

    def __init__(self, inputs: ModelInputs) -> None:
        self.inputs = inputs

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainer.datamodule.model_inputs = self.inputs


def clocks() -> tuple[float, float]:
    """Wall seconds, and the CPU seconds of this process's threads (user + system)."""
    return time.perf_counter(), time.process_time()


class EpochRecorder(L.Callback):
    """The training epoch's wall and CPU seconds, and every step's loss and seconds (loading
    its batch too)."""

    def __init__(self) -> None:
        self.seconds = self.cpu_seconds = 0.0
        self.losses: list[float] = []
        self.steps: list[float] = []
        self.cpu_steps: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self.last = clocks()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"].detach()))
        now = clocks()
        self.steps.append(now[0] - self.last[0])
        self.cpu_steps.append(now[1] - self.last[1])
        self.last = now

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = clocks()
        self.seconds, self.cpu_seconds = now[0] - self.start[0], now[1] - self.start[1]


def first_batch_loss(module: AlignmentModule, data: AlignmentDataModule) -> float:
    """The loss of the first training batch with dropout off; every module's mode is kept."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        batch = next(iter(data.train_dataloader()))
        with torch.no_grad():
            return float(module.training_step(batch, 0)["loss"])
    finally:
        for m, training in modes.items():
            m.train(training)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> None:
    """Child process: one timed epoch of ``args.mode`` on ``args.side`` (or, for ``fill``, the
    cache filled for it), reported as one JSON line."""
    torch.set_num_threads(args.threads)
    if args.side == "fill":
        print(json.dumps(dataclasses.asdict(fill_rows(args, args.mode))))
        return
    mode = MODES[args.mode]
    module, data = build(args, mode)
    inputs = side_inputs(model_inputs(module), mode, args.side)
    data.model_inputs = inputs
    data.setup("fit")
    first = first_batch_loss(module, data)
    recorder = EpochRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=args.batches,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, GivenInputs(inputs)],
    )
    L.seed_everything(args.seed, verbose=False)
    trainer.fit(module, data)
    report = {
        "seconds": recorder.seconds,
        "cpu_seconds": recorder.cpu_seconds,
        "losses": recorder.losses,
        "steps": recorder.steps,
        "cpu_steps": recorder.cpu_steps,
        "first_loss": first,
        "peak_rss": peak_rss_bytes(),
    }
    print(json.dumps(report))


def measure_in_child(args: argparse.Namespace, mode: str, side: str) -> dict:
    """:func:`worker` in a fresh process, so its peak memory is that run's alone."""
    argv = [
        f"--train-images={args.train_images}",
        f"--threads={args.threads}",
        f"--workers={args.workers}",
        f"--seed={args.seed}",
        f"--cache-dir={args.cache_dir}",
        f"--worker={mode}:{side}",
    ]
    if args.batches is not None:
        argv.append(f"--batches={args.batches}")
    # As the command line does (adaptalign.cli): idle OpenMP threads sleep instead of spinning.
    # On shared, busy cores spinning threads starve the working ones (timm's preprocessing of
    # one Flickr8k image: 49 ms instead of 3 ms at a load of 2.5 on 2 cores).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    child = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *argv],
        stdout=subprocess.PIPE,
        stderr=None if side == "fill" else subprocess.PIPE,  # filling shows its progress
        text=True,
        env=env,
    )
    if child.returncode != 0:
        print((child.stderr or "")[-4000:], file=sys.stderr)
        raise RuntimeError(f"the {mode} {side} run failed with exit status {child.returncode}")
    return json.loads(child.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ cache filling


@dataclass(frozen=True)
class Filled:
    seconds: float  # filling (zero-ish when an earlier run filled it)
    disk_bytes: int  # chunk files of the mode's prefix folders (rows other runs filled too)
    row_bytes: int  # the prefix rows this run reads
    rows: str  # how many, e.g. "1000 images, 5000 captions"
    where: str  # the folders


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("chunk-*.pt")) if folder.is_dir() else 0


def _tensor_bytes(rows: object) -> int:
    if isinstance(rows, torch.Tensor):
        return rows.numel() * rows.element_size()
    return sum(_tensor_bytes(row) for row in rows)  # type: ignore[attr-defined]


def fill_rows(args: argparse.Namespace, mode_name: str) -> Filled:
    """Everything the mode's cached run reads, computed into the cache now, untimed."""
    mode = MODES[mode_name]
    module, data = build(args, mode)
    inputs = model_inputs(module)
    data.setup("fit")
    cache = feature_cache(args.cache_dir)
    start = time.perf_counter()
    features = compute_frozen_features(inputs, data.splits["train"], cache, args.workers)
    seconds = time.perf_counter() - start
    folders, row_bytes, counts = [], 0, []
    if mode.image_blocks and features.image is not None:
        key = image_model_key(module.image_tower, inputs.transform)
        folders.append(cache.folder("image", key))
        row_bytes += sum(_tensor_bytes(row) for row in features.image.values())
        counts.append(f"{len(features.image)} images")
    if mode.text_layers and features.text is not None:
        folders.append(cache.folder("text_prefix", text_prefix_key(module.text_tower)))
        row_bytes += sum(_tensor_bytes(rows) for rows in features.text.values())
        counts.append(f"{sum(len(rows) for rows in features.text.values())} captions")
    where = ", ".join(str(f.relative_to(cache.root)) for f in folders)
    disk = sum(_folder_bytes(f) for f in folders)
    return Filled(seconds, disk, row_bytes, ", ".join(counts), where)


# --------------------------------------------------------------------------------- report


def load() -> str:
    """The machine's 1-minute load average: other work on the cores skews both sides' times."""
    return f"{os.getloadavg()[0]:.1f}"


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def judge(name: str, mode: Mode, cached: dict, recomputed: dict, filled: Filled) -> dict:
    """Prints one mode's comparison; its goals by name."""
    ratio = recomputed["seconds"] / cached["seconds"]
    mean_c = sum(cached["losses"]) / len(cached["losses"])
    mean_r = sum(recomputed["losses"]) / len(recomputed["losses"])
    epoch_diff = _relative(mean_c, mean_r)
    first_diff = _relative(cached["first_loss"], recomputed["first_loss"])
    compared = first_diff if mode.dropout else epoch_diff
    same = compared <= SAME_RTOL and math.isfinite(compared)
    print(
        f"\n{name}: image unlocked_blocks={mode.image_blocks}, text unlocked_layers="
        f"{mode.text_layers}; {len(cached['losses'])} steps of {BATCH}"
    )
    for side, run in (("cached    ", cached), ("recomputed", recomputed)):
        steps = run["steps"]
        later = f", then {step_median(run, 'steps'):.2f} s/step" if len(steps) > 1 else ""
        print(
            f"  {side} epoch {run['seconds']:7.2f} s (first step {steps[0]:.2f} s{later}; "
            f"CPU {run['cpu_seconds']:.1f} s)   peak RSS {run['peak_rss'] / 1e9:.2f} GB   "
            f"mean loss {sum(run['losses']) / len(run['losses']):.4f}   "
            f"first batch (eval mode) {run['first_loss']:.4f}"
        )
    print(
        f"  prefix cache: {filled.disk_bytes / 1e6:.1f} MB of chunk files in {filled.where} "
        f"(with rows other runs filled); this run reads {filled.rows}: "
        f"{filled.row_bytes / 1e6:.1f} MB; filled in {filled.seconds:.1f} s"
    )
    fast = ratio >= mode.goal
    cpu_ratio = recomputed["cpu_seconds"] / cached["cpu_seconds"]
    print(
        f"  ratio recomputed / cached {ratio:.2f}x (goal >= {mode.goal:g}x: {verdict(fast)}); "
        f"in CPU time {cpu_ratio:.2f}x"
    )
    if name == "text":
        bound = text_bound(TEXT_LAYERS, mode.text_layers)
        frozen = TEXT_LAYERS - mode.text_layers
        print(
            f"  text alone cannot reach 10x: recomputing adds {frozen} frozen layers' forward to "
            f"{mode.text_layers} layers' forward + backward, a compute bound of "
            f"({frozen} + {mode.text_layers}x3) / ({mode.text_layers}x3) = {bound:.2f}x"
        )
    what = "first-batch loss in eval mode" if mode.dropout else "epoch mean loss"
    print(
        f"  same result ({what}, rel diff {compared:.1e}, tolerance {SAME_RTOL:g}): "
        f"{verdict(same)}; epoch mean loss rel diff {epoch_diff:.1e}, first batch {first_diff:.1e}"
    )
    if mode.dropout:
        print(
            "    (dropout in the unlocked text layers draws differently on the two routes' input "
            "shapes, so their epochs are not step-for-step alike)"
        )
    return {f"{name} >= {mode.goal:g}x": fast, f"{name} same result": same}


def step_median(run: dict, clock: str) -> float:
    """Seconds of a step after the first (the first pays one-off costs); ``clock`` is
    ``steps`` (wall) or ``cpu_steps``."""
    steps = run[clock]
    return statistics.median(steps[1:] if len(steps) > 1 else steps)


def predict_both(runs: dict[str, dict[str, dict]]) -> None:
    """What the single-tower modes' steps predict for both, roughly (each mode ran under its own
    load): each tower's recomputing cost per step, in CPU time, added to the step over both
    cached tops, which still trains MiniLM's layers."""
    if not {"image", "text", "both"} <= runs.keys():
        return
    added = {
        name: step_median(runs[name]["recomputed"], "cpu_steps")
        - step_median(runs[name]["cached"], "cpu_steps")
        for name in ("image", "text")
    }
    cached = step_median(runs["both"]["cached"], "cpu_steps")
    predicted = (cached + sum(added.values())) / cached
    print(
        f"\nboth, predicted from the single-tower modes in CPU time: recomputing adds "
        f"{added['image']:.2f} s (image) + {added['text']:.2f} s (text) per step to a cached "
        f"step of {cached:.2f} s (both tops forward + backward): {predicted:.1f}x"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batches",
        type=int,
        default=None,
        help="train only this many batches on every side (default: the whole epoch)",
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--cache-dir", default=None, help="default: $ADAPTALIGN_CACHE or ~/.cache/adaptalign"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cache_dir = str(Path(args.cache_dir or default_cache_dir()).expanduser())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.mode, args.side = args.worker.split(":")
        worker(args)
        return 0
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the command line does; the children read it from the environment
    if not real_data():
        print(f"{TOKENS} or {WEIGHTS} not found: using the generated dataset instead")
        args.train_images = min(args.train_images, 2000)
    steps = args.train_images // BATCH
    if args.batches is not None:
        steps = min(steps, args.batches)
        print(f"only {steps} batches per epoch on every side (--batches {args.batches})")
    print(
        f"{args.train_images} train images, batch {BATCH}: {steps} steps per epoch; "
        f"{args.threads} threads; cache {args.cache_dir}"
    )
    goals: dict[str, bool] = {}
    measured: dict[str, dict[str, dict]] = {}
    began = time.perf_counter()
    for name in args.modes:
        mode = MODES[name]
        print(f"[{name}] filling the cache (load average {load()})", flush=True)
        start = time.perf_counter()
        filled = Filled(**measure_in_child(args, name, "fill"))
        print(
            f"[{name}] cache filled in {filled.seconds:.1f} s "
            f"(process {time.perf_counter() - start:.1f} s)",
            flush=True,
        )
        runs = {}
        for side in ("cached", "recomputed"):
            start = time.perf_counter()
            runs[side] = measure_in_child(args, name, side)
            print(
                f"[{name}] {side}: epoch {runs[side]['seconds']:.2f} s "
                f"(process {time.perf_counter() - start:.1f} s; load average {load()})",
                flush=True,
            )
        goals.update(judge(name, mode, runs["cached"], runs["recomputed"], filled))
        measured[name] = runs
    predict_both(measured)
    print(f"\nall modes in {time.perf_counter() - began:.0f} s")
    return overall(goals)


if __name__ == "__main__":
    sys.exit(main())
