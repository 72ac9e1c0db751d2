"""One command that checks adaptalign on this machine's NVIDIA GPUs (1 to 8), end to end.

    python benchmarks/gpu_check.py [--steps 300] [--output DIR] [--keep] [--text-model NAME]

Run from the repository root. Three parts, each reported even when another fails:

1. combined methods under DDP + bf16: ``adaptalign fit`` on the built-in generated data with
   ``configs/quickstart.yaml``, the method overlays of the combined setting (MM-TS, variance loss
   weights, TOnICS, ARL with a short warm-up) and ``configs/trainer/ddp_bf16.yaml`` last, over
   every visible GPU for ``--steps`` optimiser steps. Reported: steps/s and images/s (global batch
   = per-GPU batch x GPUs) over the steps after the first ``--warmup-steps``, and each GPU's peak
   memory (``gpu_check_probe.StepRecorder`` writes them);
2. ``RetrievalMetric`` on CUDA at 5,000 images x 25,000 captions (``bench_retrieval``'s data);
3. a 2-run comparison (``adaptalign compare``, seeds 0 and 1 of the quick start, one GPU per run):
   which GPU each run started on, and whether the two runs got different GPUs.

Everything goes to a scratch folder (data cache included, so nothing of the user's is touched),
removed at the end unless ``--keep`` or ``--output`` is given or a part failed. The exit status
is 0 when every part ran, 1 otherwise, and 1 when no GPU is visible: nothing checked never reads
as a pass.
The quick start's text model (MiniLM) is downloaded on first use; on a machine without internet,
point ``--text-model`` at a local sentence-transformers or transformers folder.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from goals import overall

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
CONFIGS = ROOT / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
# The combined setting, in the order the project layers it (tests/helpers/builders.py).
METHODS = ("mmts_infonce", "loss_weight_variance", "tonics", "arl", "arl_short")
DDP_BF16 = CONFIGS / "trainer" / "ddp_bf16.yaml"
PROBE = "gpu_check_probe.StepRecorder"
# The fit's trainer as configs/trainer/ddp_bf16.yaml sets it, or the same fit on one CPU process.
GPU_TRAINER: tuple[str, ...] = ()
CPU_TRAINER = (
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
)
# Each run of the comparison on the one GPU Ray gives its worker (Ray sets CUDA_VISIBLE_DEVICES).
GPU_RUN = ("--trainer.accelerator=gpu", "--trainer.devices=1")
RETRIEVAL_IMAGES = 5000
CAPTIONS_PER_IMAGE = 5
LOG_TAIL = 30
GIB = 1024**3


# ----------------------------------------------------------------------------- what is visible


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 when torch has no usable CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_names(count: int) -> list[str]:
    return [torch.cuda.get_device_name(index) for index in range(count)]


def no_gpu_message() -> str:
    """Why nothing was checked: what CUDA_VISIBLE_DEVICES says and what torch was built with."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "not set" if visible is None else f"set to {visible!r}"
    build = (
        f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only torch build)"
    )
    return (
        f"gpu_check: no GPU is visible (torch.cuda.is_available() is "
        f"{torch.cuda.is_available()}, {torch.cuda.device_count()} CUDA devices).\n"
        f"  CUDA_VISIBLE_DEVICES is {shown}; torch {torch.__version__} is built with {build}.\n"
        "  Nothing was checked; exit status 1."
    )


def describe_gpus(names: Sequence[str]) -> str:
    """``2 x NVIDIA H100 80GB HBM3`` (kinds in the order they appear)."""
    return ", ".join(f"{count} x {name}" for name, count in Counter(names).items())


# ----------------------------------------------------------------------------- running commands


class PartFailed(Exception):
    """A part that could not finish: why, and the log whose tail says more."""

    def __init__(self, reason: str, logs: Sequence[Path] = ()) -> None:
        super().__init__(reason)
        self.logs = list(logs)


def child_env(cache: Path) -> dict[str, str]:
    """The environment of every command: the probe and the project importable, a scratch cache."""
    paths = [str(BENCHMARKS), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "ADAPTALIGN_CACHE": str(cache),
        "PYTHONUNBUFFERED": "1",
    }


def stop_group(process: subprocess.Popen) -> None:
    """Ends the command and the processes it started (its own process group), politely first."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(command: Sequence[str], log: Path, cwd: Path, env: dict, timeout: float) -> int:
    """Runs a command with its output in ``log``; its status, or 124 when stopped at ``timeout``.

    The command gets a process group of its own, so DDP's processes and Ray's go with it when it
    is stopped.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        handle.write(f"$ {shlex.join(command)}\n\n")
        handle.flush()
        process = subprocess.Popen(
            list(command),
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(process)
            handle.write(f"\ngpu_check: stopped after {timeout:.0f} s\n")
            return 124
        except BaseException:  # Ctrl-C: leave nothing running
            stop_group(process)
            raise


def tail(log: Path, lines: int = LOG_TAIL) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"    (no log: {exc})"
    return "\n".join(f"    {line}" for line in text[-lines:])


# ----------------------------------------------------------------------------- 1. combined fit


def combined_command(
    folder: Path,
    cache: Path,
    steps: int,
    trainer: Sequence[str] = GPU_TRAINER,
    extra: Sequence[str] = (),
) -> list[str]:
    """``adaptalign fit`` of the combined methods for ``steps`` optimiser steps, into ``folder``.

    ``trainer`` comes right after the config layers (the CPU variant replaces ddp_bf16.yaml's
    settings); ``extra`` after the run's own settings; the probe last, so ``output_dir`` is its.
    """
    layers = [QUICKSTART, *(CONFIGS / "methods" / f"{name}.yaml" for name in METHODS), DDP_BF16]
    return [
        sys.executable,
        "-m",
        "adaptalign",
        "fit",
        *(arg for layer in layers for arg in ("--config", str(layer))),
        *trainer,
        f"--trainer.max_steps={steps}",
        "--trainer.max_epochs=-1",  # the steps decide, not the quick start's 6 epochs
        "--methods.tonics.ramp_epochs=3",  # with no epoch count, the curriculum needs its own
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={folder}",
        f"--trainer.logger.save_dir={folder}",
        f"--data.cache_dir={cache}",
        *extra,
        f"--trainer.callbacks+={PROBE}",
        f"--trainer.callbacks.output_dir={folder / 'probe'}",
    ]


@dataclass(frozen=True)
class Throughput:
    """Training speed from step timestamps.

    ``steps_per_s`` counts only the gaps between two steps of one epoch, so validation, the
    checkpoints and the loaders' restart at epoch ends are left out; ``overall_steps_per_s`` is
    from the first measured step to the last, all of that included.
    """

    steps_per_s: float
    images_per_s: float
    global_batch: int
    measured_gaps: int
    overall_steps_per_s: float


def throughput(
    steps: Sequence[Sequence[float]], warmup: int, batch_size: int, devices: int
) -> Throughput:
    """From ``[global_step, epoch, seconds]`` per step (in order) and the per-device batch."""
    kept = list(steps[warmup:])
    if len(kept) < 2:
        raise ValueError(
            f"{len(steps)} steps recorded, the first {warmup} are warm-up: too few to time"
        )
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(kept) if a[1] == b[1]]
    if not gaps or sum(gaps) <= 0:
        raise ValueError("no two measured steps fall in one epoch: too few steps per epoch")
    steps_per_s = len(gaps) / sum(gaps)
    global_batch = batch_size * devices
    span = kept[-1][2] - kept[0][2]
    return Throughput(
        steps_per_s,
        steps_per_s * global_batch,
        global_batch,
        len(gaps),
        (len(kept) - 1) / span if span > 0 else float("nan"),
    )


@dataclass
class Report:
    """What a part found: the lines printed as it ends, and the ones the summary repeats."""

    lines: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)


def read_probe(folder: Path, expected: int, log: Path) -> list[dict]:
    """Every rank's record, rank 0 first; a missing rank is a failure (its process ended badly)."""
    records = {}
    for path in sorted(folder.glob("rank*.json")):
        record = json.loads(path.read_text())
        records[int(record["rank"])] = record
    missing = sorted(set(range(expected)) - records.keys())
    if missing:
        raise PartFailed(f"no step record from rank(s) {missing} (expected {expected})", [log])
    return [records[rank] for rank in sorted(records)]


def check_combined(
    output: Path,
    cache: Path,
    steps: int,
    warmup: int,
    devices: int,
    timeout: float,
    trainer: Sequence[str] = GPU_TRAINER,
    extra: Sequence[str] = (),
) -> Report:
    """Part 1: the combined fit, its speed after the warm-up and every device's peak memory."""
    folder = output / "combined"
    log = output / "combined.log"
    shutil.rmtree(folder, ignore_errors=True)  # an earlier check's step records are not this one's
    command = combined_command(folder, cache, steps, trainer, extra)
    status = run_logged(command, log, folder.parent, child_env(cache), timeout)
    if status != 0:
        raise PartFailed(f"adaptalign fit exited with status {status}", [log])
    records = read_probe(folder / "probe", max(devices, 1), log)
    first = records[0]
    world = int(first["world_size"])
    if first["batch_size"] is None:
        raise PartFailed("the probe saw no batch size", [log])
    speed = throughput(first["steps"], warmup, int(first["batch_size"]), world)
    last_step = int(first["steps"][-1][0])
    where = f"{world} x {first['device'].split(':')[0]}"
    report = Report()
    report.lines.append(
        f"  {where}: {speed.steps_per_s:.2f} steps/s, {speed.images_per_s:.0f} images/s "
        f"(global batch {first['batch_size']} x {world} = {speed.global_batch}; "
        f"{speed.measured_gaps} step gaps after the first {warmup} of {last_step} steps, "
        f"epoch ends left out)"
    )
    report.lines.append(
        f"  with validation and epoch ends: {speed.overall_steps_per_s:.2f} steps/s"
    )
    memory = [
        f"{r['device']} {r['max_memory_allocated'] / GIB:.2f} GiB"
        for r in records
        if "max_memory_allocated" in r
    ]
    if memory:
        report.lines.append("  peak memory allocated: " + ", ".join(memory))
    report.summary = [
        f"combined methods ({where}): {speed.steps_per_s:.2f} steps/s, "
        f"{speed.images_per_s:.0f} images/s (global batch {speed.global_batch})",
    ]
    if memory:
        report.summary.append("peak GPU memory: " + ", ".join(memory))
    return report


# ----------------------------------------------------------------------------- 2. retrieval


def check_retrieval(
    device: str,
    images: int = RETRIEVAL_IMAGES,
    captions_per_image: int = CAPTIONS_PER_IMAGE,
    repeats: int = 3,
) -> Report:
    """Part 2: ``RetrievalMetric`` on ``device`` with bench_retrieval's data; time and peak."""
    from bench_retrieval import make_data, run_metric

    here = torch.device(device)
    cuda = here.type == "cuda"

    def on_device(data: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(here) for t in data)

    def wait() -> None:
        if cuda:
            torch.cuda.synchronize(here)

    run_metric(on_device(make_data(200, captions_per_image, 256, 0.3, 1)), 1024)  # warm-up
    data = on_device(make_data(images, captions_per_image, 256, 0.3, 0))
    wait()
    if cuda:
        torch.cuda.reset_peak_memory_stats(here)
    times, rsum = [], float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        _, result = run_metric(data, 1024)
        rsum = float(result["rsum"])  # a host value: the device has finished
        wait()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(here) if cuda else None
    del data
    if cuda:
        torch.cuda.empty_cache()
    size = f"{images} images x {images * captions_per_image} captions on {here}"
    memory = f", peak memory allocated {peak / GIB:.2f} GiB (embeddings included)" if peak else ""
    median = statistics.median(times)
    report = Report(
        lines=[
            f"  {size}: median {median:.3f} s, min {min(times):.3f} s over {repeats} runs"
            f"{memory}; rsum {rsum:.1f}"
        ]
    )
    report.summary = [f"retrieval metric ({size}): {median:.3f} s{memory}"]
    return report


# ----------------------------------------------------------------------------- 3. comparison


def compare_command(
    output: Path,
    gpus_per_run: int = 1,
    trainer: Sequence[str] = GPU_RUN,
    extra: Sequence[str] = (),
) -> list[str]:
    """Two quick-start runs (seeds 0 and 1) of one epoch, at once, ``gpus_per_run`` each."""
    return [
        sys.executable,
        "-m",
        "adaptalign",
        "compare",
        "--configs",
        str(QUICKSTART),
        "--seeds",
        "0",
        "1",
        "--gpus-per-run",
        str(gpus_per_run),
        "--jobs",
        "2",
        "--output",
        str(output),
        "--override",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        *trainer,
        *extra,
    ]


# ``[2/4] NAME n=16 seed=0 started on 192.0.2.2 GPU 1`` (or ``resumed from PATH ... on ...``).
STARTED = re.compile(
    r"^\[\d+/\d+\] (?P<label>.+?) (?:started|resumed from .+) on (?P<node>\S+)"
    r"(?: GPU (?P<gpus>[\d,]+))?\s*$"
)


@dataclass(frozen=True)
class Start:
    """Where a run of the comparison started: the machine and its GPUs (empty: none)."""

    node: str
    gpus: str

    def describe(self) -> str:
        return f"GPU {self.gpus}" if self.gpus else "no GPU"


def run_starts(printed: str) -> dict[str, Start]:
    """Each run's label -> where it last started, from ``adaptalign compare``'s progress lines."""
    starts = {}
    for line in printed.splitlines():
        found = STARTED.match(line.strip())
        if found:
            starts[found["label"]] = Start(found["node"], found["gpus"] or "")
    return starts


def placement_verdict(starts: dict[str, Start], gpus: int) -> tuple[bool, str]:
    """Whether two runs were placed as ``gpus`` visible GPUs allow, and the sentence saying so."""
    if len(starts) != 2:
        return False, f"expected the start lines of 2 runs, found {len(starts)}"
    where = [start.describe() for start in starts.values()]
    if gpus == 0:
        return True, "no GPU: both runs ran on CPUs (placement on GPUs not checked)"
    if any(not start.gpus for start in starts.values()):
        return False, "a run started without a GPU although GPUs are visible"
    if gpus == 1:
        return True, (
            f"one GPU: the two runs shared {where[0]} one after another; "
            "placement on 2 GPUs was not checked"
        )
    if where[0] == where[1]:
        return False, f"both runs got {where[0]} although {gpus} GPUs are visible"
    return True, "the two runs got different GPUs"


def check_compare(
    output: Path,
    cache: Path,
    gpus: int,
    timeout: float,
    gpus_per_run: int = 1,
    trainer: Sequence[str] = GPU_RUN,
    extra: Sequence[str] = (),
) -> Report:
    """Part 3: a 2-run comparison on Ray; which GPU each run used, and were they different."""
    folder = output / "compare"
    log = output / "compare.log"
    shutil.rmtree(folder, ignore_errors=True)  # finished runs of an earlier check would be skipped
    command = compare_command(folder, gpus_per_run, trainer, extra)
    status = run_logged(command, log, ROOT, child_env(cache), timeout)
    run_logs = sorted(folder.glob("runs/**/log.txt"))
    unfinished = [p for p in run_logs if not (p.parent / "summary.json").is_file()]
    if status != 0:
        raise PartFailed(f"adaptalign compare exited with status {status}", [log, *unfinished])
    starts = run_starts(log.read_text(errors="replace"))
    ok, verdict = placement_verdict(starts, gpus)
    placed = ", ".join(f"{label} -> {start.describe()}" for label, start in starts.items())
    if not ok:
        raise PartFailed(f"{verdict} ({placed or 'no start line'})", [log])
    report = Report(lines=[f"  {placed}", f"  {verdict}"])
    report.summary = [f"comparison: {placed}; {verdict}"]
    return report


# ----------------------------------------------------------------------------- the whole check


@dataclass
class Outcome:
    name: str
    report: Report | None
    error: str = ""


def run_part(name: str, part: Callable[[], Report]) -> Outcome:
    """Runs one part; a failure is printed with its log's tail and the next part still runs."""
    print(f"\n== {name}", flush=True)
    started = time.monotonic()
    try:
        report = part()
    except PartFailed as exc:
        print(f"  FAILED: {exc}")
        for log in exc.logs:
            print(f"  last lines of {log}:\n{tail(log)}")
        return Outcome(name, None, str(exc))
    except Exception as exc:
        print(f"  FAILED: {type(exc).__name__}: {exc}")
        print("\n".join(f"    {line}" for line in traceback.format_exc().splitlines()[-LOG_TAIL:]))
        return Outcome(name, None, f"{type(exc).__name__}: {exc}")
    print("\n".join(report.lines))
    print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
    return Outcome(name, report)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps of the DDP fit")
    parser.add_argument(
        "--warmup-steps", type=int, default=20, help="first steps left out of steps/s"
    )
    parser.add_argument("--output", type=Path, help="folder for logs and runs (default: scratch)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--text-model",
        help="text tower (and caption clusters' encoder) instead of the quick start's MiniLM: "
        "a local folder on a machine without internet",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds each command may run at most"
    )
    args = parser.parse_args(argv)
    if args.steps < args.warmup_steps + 3:
        parser.error(f"--steps must exceed --warmup-steps ({args.warmup_steps}) by 3 at least")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    count = visible_gpus()
    if count == 0:
        print(no_gpu_message(), file=sys.stderr)
        return 1
    names = gpu_names(count)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "not set")
    print(
        f"GPUs: {describe_gpus(names)} (CUDA_VISIBLE_DEVICES {visible}); torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}"
    )
    if not torch.cuda.is_bf16_supported():
        print("note: this GPU does not support bf16; the DDP + bf16 fit is expected to fail")

    scratch = args.output is None
    output = Path(tempfile.mkdtemp(prefix="gpu_check_")) if scratch else args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    cache = output / "cache"
    print(f"logs, runs and data cache in {output}")
    text_model = [f"--model.text_tower.model_name={args.text_model}"] if args.text_model else []
    clusters = [f"--data.clusters.text_model={args.text_model}"] if args.text_model else []

    outcomes = [
        run_part(
            f"combined methods, DDP + bf16 on {count} GPU(s), {args.steps} steps",
            lambda: check_combined(
                output,
                cache,
                args.steps,
                args.warmup_steps,
                count,
                args.timeout,
                extra=[*text_model, *clusters],
            ),
        ),
        run_part(
            f"retrieval metric, {RETRIEVAL_IMAGES} images on cuda",
            lambda: check_retrieval("cuda"),
        ),
        run_part(
            "2-run comparison, one GPU per run",
            lambda: check_compare(output, cache, count, args.timeout, extra=text_model),
        ),
    ]

    print("\n== summary")
    print(f"GPUs: {describe_gpus(names)}")
    for outcome in outcomes:
        if outcome.report is not None:
            print("\n".join(outcome.report.summary))
        else:
            print(f"{outcome.name}: FAILED ({outcome.error})")
    failed = any(outcome.report is None for outcome in outcomes)
    if scratch and not args.keep and not failed:
        shutil.rmtree(output, ignore_errors=True)
        print(f"(removed {output}; --keep keeps it)")
    else:
        print(f"logs and runs kept in {output}")
    return overall({outcome.name: outcome.report is not None for outcome in outcomes})


if __name__ == "__main__":
    sys.exit(main())
