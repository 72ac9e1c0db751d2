"""Running a comparison: one ``adaptalign fit`` process per run, each in a folder of its own.

A run is finished when its ``summary.json`` exists (the :class:`RunSummary` callback writes it
atomically at the end of ``fit``), so re-running a comparison skips finished runs. An unfinished
run that was started with the same arguments continues from its ``last.ckpt`` (written after every
validation, atomically), in the same log folder; resuming is exact, so results never depend on
where an interruption happened. "The same arguments" includes the content of every file they name
(config layers, vocabularies), so editing a config between attempts starts the run afresh. Any other
unfinished run starts again from scratch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptalign.common.atomic_files import atomic_save
from adaptalign.common.exit_status import BAD_INPUT
from adaptalign.experiments.collapse_flags import collapse_columns, epochs_words
from adaptalign.experiments.compare_results import summary_row
from adaptalign.experiments.in_process import fit_here, needs_own_process
from adaptalign.experiments.ray_pool import Placement, WorkerPool, worker_pool

TrainImages = int | float | None
LOG_TAIL_LINES = 15
FIT_ARGUMENTS = 4  # where the arguments of ``python -m adaptalign fit ...`` start
ATTEMPTS = 2  # a failed run is tried once more


def size_label(train_images: TrainImages) -> str:
    return "all" if train_images is None else str(train_images)


@dataclass(frozen=True)
class Run:
    """One ``adaptalign fit`` of the comparison and the folder it owns."""

    name: str
    config: str
    train_images: TrainImages
    seed: int
    folder: Path

    @property
    def summary_path(self) -> Path:
        return self.folder / "summary.json"

    @property
    def log_path(self) -> Path:
        return self.folder / "log.txt"

    @property
    def label(self) -> str:
        return f"{self.name} n={size_label(self.train_images)} seed={self.seed}"

    def finished(self) -> bool:
        return self.summary_path.is_file()


def fit_command(run: Run, overrides: Sequence[str]) -> list[str]:
    """The ``adaptalign fit`` of one run: its seed, data size, folder, logger and summary."""
    folder = str(run.folder)
    layers = [arg for part in run.config.split("+") for arg in ("--config", part)]
    command = [sys.executable, "-m", "adaptalign", "fit", *layers]
    command += ["--seed_everything", str(run.seed), "--data.seed", str(run.seed)]
    if run.train_images is not None:
        command += ["--data.train_images", str(run.train_images)]
    command += [
        "--trainer.default_root_dir",
        folder,
        "--trainer.logger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir",
        folder,
        "--trainer.logger.name",
        "",
    ]
    # The summary callback comes after the overrides, so an override that adds a callback and
    # sets it (``--trainer.callbacks+=X --trainer.callbacks.a=1``) sets its own, not the summary.
    # A method's settings are overridden by key: ``--methods.arl.gamma=0.5``.
    summary = [
        "--trainer.callbacks+=adaptalign.callbacks.run_summary.RunSummary",
        f"--trainer.callbacks.output_path={run.summary_path}",
    ]
    return [*command, *overrides, *summary]


@dataclass(frozen=True)
class Outcome:
    """How one run went: its exit status, duration and the last lines of its log."""

    run: Run
    returncode: int
    seconds: float
    log_tail: list[str]
    lost: str = ""  # why the worker went away with the run, when it did

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.lost and self.run.finished()

    @property
    def reason(self) -> str:
        if self.lost:
            return f"its worker died: {self.lost}"
        if self.returncode != 0:
            return f"exit {self.returncode}"
        return "ended without writing summary.json"

    @property
    def worth_retrying(self) -> bool:
        """A crash or a lost machine may not happen again; a refused setting (status 2) will."""
        return not self.ok and self.returncode != BAD_INPUT


def file_digests(arguments: Sequence[str], outputs: Path | None = None) -> dict[str, str]:
    """SHA-256 of every file the arguments name (``--config a.yaml``, ``--data.vocabulary=v.json``),
    except the run's own outputs under ``outputs`` (its ``summary.json`` exists only once it ran).

    Code defaults are not covered: a run that continues after the package changed uses the new code.
    """
    digests = {}
    for argument in arguments:
        value = argument.partition("=")[2] if argument.startswith("--") else argument
        path = Path(value)
        if outputs is not None and path.resolve().is_relative_to(outputs.resolve()):
            continue
        if value and path.is_file():
            digests[value] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def same_setting(run: Run, overrides: Sequence[str]) -> bool:
    """Whether the run's recorded attempt had these arguments and the files they name unchanged."""
    arguments = fit_command(run, overrides)[1:]
    record = recorded_run(run)
    files = file_digests(arguments, run.folder)
    return record.get("arguments") == arguments and record.get("files") == files


def resume_point(run: Run, overrides: Sequence[str]) -> Path | None:
    """The ``last.ckpt`` an interrupted attempt in the very same setting left, if there is one.

    An attempt in another setting (another config, other overrides, an edited config file) is never
    continued: its weights would mix two settings.
    """
    if run.finished() or not same_setting(run, overrides):
        return None
    checkpoints = list(run.folder.glob("version_*/checkpoints/last.ckpt"))
    return checkpoints[0] if len(checkpoints) == 1 else None


def execute(run: Run, overrides: Sequence[str], in_process: bool = False) -> Outcome:
    """Runs one fit, its output going to ``log.txt``: in a process of its own, or in this one
    (``in_process``, a warm worker; see :mod:`adaptalign.experiments.in_process`).

    It continues an interrupted attempt from its ``last.ckpt`` (see :func:`resume_point`), logging
    to the same version folder; otherwise it starts from scratch in an emptied folder.
    """
    command = fit_command(run, overrides)
    checkpoint = resume_point(run, overrides)
    if checkpoint is None:
        if run.folder.exists():  # an attempt that cannot be continued: never mix its files in
            shutil.rmtree(run.folder)
        run.folder.mkdir(parents=True)
        record = {
            "name": run.name,
            "config": run.config,
            "train_images": run.train_images,
            "seed": run.seed,
            "arguments": command[1:],
            "files": file_digests(command[1:], run.folder),
        }
        atomic_save(run.folder / "run.json", json.dumps(record, indent=2) + "\n")
    else:
        version = checkpoint.parent.parent.name  # a string, so the logger keeps the folder name
        command += ["--ckpt_path", str(checkpoint), "--trainer.logger.version", version]
    started = time.monotonic()
    mode, gap = ("w", "") if checkpoint is None else ("a", "\n")  # a resumed run's log goes on
    with run.log_path.open(mode) as log:
        log.write(f"{gap}$ {shlex.join(command)}\n\n")
    if in_process:
        returncode = fit_here(command[FIT_ARGUMENTS:], run.log_path, append=True)
    else:
        with run.log_path.open("a") as log:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            returncode = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False
            ).returncode
    seconds = time.monotonic() - started
    return Outcome(run, returncode, seconds, log_tail(run))


def log_tail(run: Run) -> list[str]:
    try:
        return run.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return []


def recorded_run(run: Run) -> dict[str, Any]:
    """What ``run.json`` says of the run's last attempt; empty when missing or unreadable."""
    try:
        record = json.loads((run.folder / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def checkpoint_position(checkpoint: Path) -> str:
    """Where a checkpoint is, for the progress line; an unreadable one is left to fit to report."""
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        return f" (epoch {saved['epoch']}, step {saved['global_step']})"
    except Exception:  # the fit that loads it says what is wrong
        return ""


def format_duration(seconds: float) -> str:
    """``7.9s``, ``41s``, ``3m 20s``, ``2h 05m``: a tenth of a second where it tells runs apart."""
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def remaining_seconds(durations: Sequence[float], remaining: int, jobs: int) -> float | None:
    """Time the ``remaining`` runs will take, from the runs finished so far (in finishing order).

    The first round of runs (one per job) also does the comparison's one-time work: generating
    data, extracting frozen-tower features, encoding captions for clusters. On Flickr8k that is
    about 10 minutes against seconds for a run that finds them cached, so it is left out: the
    estimate is the median of the later runs (robust to a later run that adds a few missing
    features), and there is none until one of them has finished.
    """
    later = list(durations[jobs:])
    if remaining <= 0 or not later:
        return None
    return math.ceil(remaining / jobs) * float(np.median(later))


class Progress:
    """Each run's start and end, the counts and an ETA (:func:`remaining_seconds`)."""

    def __init__(self, total: int, to_run: int, slots: int) -> None:
        self.total, self.to_run, self.slots = total, to_run, slots
        self.durations: list[float] = []
        self.running = 0

    def say(self, index: int, run: Run, text: str) -> None:
        print(f"[{index + 1}/{self.total}] {run.label} {text}", flush=True)

    def counts(self) -> str:
        ended = len(self.durations)
        pending = self.to_run - ended - self.running
        return f"{ended} ended, {self.running} running, {pending} waiting"

    def eta(self, seconds: float) -> str:
        self.durations.append(seconds)
        remaining = self.to_run - len(self.durations)
        if remaining <= 0:
            return ""
        left = remaining_seconds(self.durations, remaining, self.slots)
        if left is None:
            return "; no ETA yet: the first runs also prepare data and features, once"
        return f"; ETA {format_duration(left)}"


def run_all(runs: list[Run], overrides: Sequence[str], placement: Placement) -> list[Outcome]:
    """Runs every unfinished run on Ray workers (:mod:`adaptalign.experiments.ray_pool`).

    A run that fails is tried once more (it goes on from its ``last.ckpt`` when it has one: a
    pre-empted machine), except when its settings were refused; a failure never stops the
    others. Returns the failed runs' outcomes.
    """
    todo = [(index, run) for index, run in enumerate(runs) if not run.finished()]
    for index, run in enumerate(runs):
        if run.finished():
            note = ""
            if recorded_run(run) and not same_setting(run, overrides):
                note = (
                    "; note: it ran with other arguments or config files, "
                    "delete its summary.json to re-run"
                )
            print(f"[{index + 1}/{len(runs)}] {run.label} skipped (finished){note}", flush=True)
    if not todo:
        return []
    with worker_pool(placement) as pool:
        print(f"Ray places the runs: {pool.share.describe()}", flush=True)
        progress = Progress(len(runs), len(todo), pool.share.slots)
        return list(drive(pool, todo, overrides, placement.warm, progress))


def drive(
    pool: WorkerPool,
    todo: list[tuple[int, Run]],
    overrides: Sequence[str],
    warm: bool,
    progress: Progress,
) -> Iterator[Outcome]:
    """Feeds the pool, prints each start and end with the counts, retries once; yields failures."""
    tries: dict[int, int] = {}
    started: dict[int, float] = {}

    def arguments(item: tuple[int, Run]) -> tuple:
        run = item[1]
        here = warm and not needs_own_process(fit_command(run, overrides), pool.share.gpus)
        return (run, overrides, here)

    for event in pool.run(todo, execute, arguments):
        index, run = event.item
        if event.kind == "started":
            tries[index] = tries.get(index, 0) + 1
            started[index] = time.monotonic()
            progress.running += 1
            checkpoint = resume_point(run, overrides)
            how = "started" if checkpoint is None else f"resumed from {checkpoint}"
            where = checkpoint_position(checkpoint) if checkpoint is not None else ""
            progress.say(index, run, f"{how}{where} on {event.where}")
            continue
        progress.running -= 1
        outcome = event.value
        if outcome is None:
            lost = str(event.error).splitlines()[0] if event.error else "unknown"
            seconds = time.monotonic() - started[index]
            outcome = Outcome(run, -1, seconds, log_tail(run), lost=lost)
        took = format_duration(outcome.seconds)
        if outcome.worth_retrying and tries[index] < ATTEMPTS:
            progress.say(index, run, f"FAILED ({outcome.reason}) in {took}; trying once more")
            pool.again(event.item)
            continue
        eta = progress.eta(outcome.seconds)
        if outcome.ok:
            text = f"done in {took} ({headline(run)})"
        else:
            text = f"FAILED ({outcome.reason}) in {took}; see {run.log_path}"
            yield outcome
        progress.say(index, run, f"{text}; {progress.counts()}{eta}")


def headline(run: Run) -> str:
    """The run's numbers for its progress line: on the report split when it has one (selected
    on the selection split), else its best validation."""
    summary = json.loads(run.summary_path.read_text())
    report = summary.get("report") or {}
    shown = report or summary.get("best") or {}
    if not shown:
        return "no validation"
    parts = [f"{k.replace('_', ' ')} {shown[k]:.1f}" for k in ("i2t_R@1", "t2i_R@1") if k in shown]
    if "rsum" in shown:
        parts.append(f"rsum {shown['rsum']:.1f}")
    if report:
        parts.append(
            f"on {report['split']}, epoch {report['epoch']} selected on {report['selected_on']}"
        )
    flags = collapse_columns(summary)
    if flags["collapse_epochs"]:
        parts.append(f"COLLAPSED at {epochs_words(flags['collapse_epochs'])}")
    return ", ".join(parts)


def finished_rows(runs: Iterable[Run]) -> list[dict[str, Any]]:
    return [
        summary_row(
            run.name,
            size_label(run.train_images),
            run.seed,
            json.loads(run.summary_path.read_text()),
        )
        for run in runs
        if run.finished()
    ]


def discover_runs(output: Path) -> list[Run]:
    """Every run under ``OUTPUT/runs`` that recorded its settings, for a report without a plan."""
    runs = []
    for record_path in sorted((output / "runs").glob("*/*/*/run.json")):
        record = json.loads(record_path.read_text())
        runs.append(
            Run(
                record["name"],
                record["config"],
                record["train_images"],
                int(record["seed"]),
                record_path.parent,
            )
        )
    return runs


def report_order(runs: list[Run], names: Sequence[str] | None = None) -> list[Run]:
    """Config (in the given order), then training size, then seed: the order of the tables."""
    order = {name: i for i, name in enumerate(names or sorted({r.name for r in runs}))}

    def size_key(size: TrainImages) -> tuple[int, float]:
        return (1, 0.0) if size is None else (0, float(size))

    return sorted(
        runs, key=lambda r: (order.get(r.name, len(order)), size_key(r.train_images), r.seed)
    )
