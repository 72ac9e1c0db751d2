"""Warm vs fresh workers: what a short run costs under ``adaptalign compare``, and Ray's share.

    python benchmarks/bench_warm_workers.py [--runs 10] [--threads 2] [--output DIR]

Run from the repository root. The same comparison of ``--runs`` frozen-feature runs (the Flickr8k
base setting with a fixed temperature, 1,000 training images, 15 epochs, validation every epoch,
seeds 0..N-1, one run at a time) goes twice through ``adaptalign compare``: with ``--workers warm``
(every fit inside the worker's long-lived process) and ``--workers fresh`` (a new ``python -m
adaptalign fit`` per run), into ``DIR/warm`` and ``DIR/fresh`` (both replaced; a temporary folder
without ``--output``). Printed side by side: each run's wall time, from the moment the command
printed its ``started`` line to its ``done`` line (everything the run costs, teardown and Ray's
round trip included), beside the whole seconds the command printed itself; the first run, which
also loads what later runs find cached, apart from the median of the others;
each command's whole wall time; and Ray's own costs, measured here with the same pool the command
uses: starting Ray, starting a worker, and the round trip of an empty call. The frozen features must
be cached already (any earlier Flickr8k run builds them), or the first run of each mode includes
building them.

Goals: the median warm run (runs 2..N) takes <= 10 s on 2 cores, and every seed's ``summary.json``
has the same ``history`` and ``best`` in both modes. Uses ../shared/data/flickr8k and
../shared/weights. The machine's load average is printed too: other work on it slows every run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from goals import overall, verdict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # adaptalign as ``python -m adaptalign`` from the root sees it
GOAL_S = 10.0
NAME = "fixed_temperature"
CONFIGS = "configs/flickr8k/base.yaml+configs/flickr8k/fixed_temperature.yaml"
TRAIN_IMAGES = 1000
# Pinned here, so an edited base.yaml cannot change what the benchmark measures.
OVERRIDES = ("--trainer.max_epochs=15", "--trainer.check_val_every_n_epoch=1")
MODES = ("warm", "fresh")
COMPARED = ("history", "best")
PROGRESS = re.compile(r"^\[\d+/\d+\] \S+ n=\S+ seed=(\d+) (started|resumed|done in (.+?) \()")
EMPTY_CALLS = 20


@dataclass
class Comparison:
    """One ``adaptalign compare`` of the benchmark: its wall time and what each run left."""

    mode: str
    wall_s: float
    returncode: int
    seconds: dict[int, float] = field(default_factory=dict)  # seed -> started to done
    printed: dict[int, str] = field(default_factory=dict)  # seed -> the command's "done in"
    summaries: dict[int, dict] = field(default_factory=dict)  # seed -> summary.json


@dataclass(frozen=True)
class RayOverhead:
    """Seconds to start Ray and one worker; the median round trip of an empty call."""

    start_s: float
    worker_s: float
    call_s: float


def empty() -> None:
    """The work of an empty call: nothing, so its round trip is Ray's alone."""


def measure_ray_overhead(threads: int) -> RayOverhead:
    """Ray's costs in this process, with the pool ``adaptalign compare`` uses, one run at a time."""
    from adaptalign.experiments.ray_pool import (
        Placement,
        WorkerPool,
        alive_nodes,
        ray_session,
        share_of,
    )

    start = time.perf_counter()
    with ray_session(None) as ray:
        started = time.perf_counter() - start
        share = share_of(Placement(jobs=1, cpus_per_run=threads), alive_nodes(ray), local=True)
        pool = WorkerPool(ray, share, ROOT)
        start = time.perf_counter()
        actor, _ = pool.new_worker()
        worker = time.perf_counter() - start
        ray.get(actor.call.remote(empty))  # the first call also ships the function
        calls = []
        for _ in range(EMPTY_CALLS):
            start = time.perf_counter()
            ray.get(actor.call.remote(empty))
            calls.append(time.perf_counter() - start)
    return RayOverhead(started, worker, statistics.median(calls))


def compare_command(mode: str, seeds: Sequence[int], output: Path) -> list[str]:
    """The ``adaptalign compare`` of one mode: the same runs, one at a time."""
    return [
        sys.executable,
        "-m",
        "adaptalign",
        "compare",
        "--configs",
        CONFIGS,
        "--names",
        NAME,
        "--seeds",
        *map(str, seeds),
        "--train-images",
        str(TRAIN_IMAGES),
        "--output",
        str(output),
        "--jobs",
        "1",
        "--workers",
        mode,
        "--override",
        *OVERRIDES,
    ]


def run_folder(output: Path, seed: int) -> Path:
    return output / "runs" / NAME / f"n{TRAIN_IMAGES}" / f"seed{seed}"


def run_comparison(mode: str, seeds: Sequence[int], output: Path, threads: int) -> Comparison:
    """Runs one mode's comparison into an emptied ``output``, timing each line it prints as it
    comes; its output also goes to ``compare.log``."""
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = compare_command(mode, seeds, output)
    started: dict[int, float] = {}
    result = Comparison(mode, 0.0, 0)
    start = time.perf_counter()
    with (output / "compare.log").open("w") as log:
        with subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                now = time.perf_counter()
                log.write(line)
                match = PROGRESS.match(line)
                if match is None:
                    continue
                seed = int(match.group(1))
                if match.group(3) is None:  # started (again, after a failed attempt)
                    started[seed] = now
                elif seed in started:
                    result.seconds[seed] = now - started[seed]
                    result.printed[seed] = match.group(3)
        result.returncode = process.returncode
    result.wall_s = time.perf_counter() - start
    for seed in seeds:
        summary = run_folder(output, seed) / "summary.json"
        if summary.is_file():
            result.summaries[seed] = json.loads(summary.read_text())
    return result


def first_difference(a: dict, b: dict) -> str | None:
    """Where two summaries differ in ``history`` or ``best``; None when they agree exactly."""
    for key in COMPARED:
        left, right = a.get(key), b.get(key)
        if left == right:
            continue
        if isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
            for index, (x, y) in enumerate(zip(left, right, strict=True)):
                if x != y:
                    keys = [k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
                    shown = ", ".join(f"{k} {x.get(k)} vs {y.get(k)}" for k in keys[:3])
                    return f"{key}[{index}]: {shown}"
        return f"{key}: {left} vs {right}"
    return None


def seconds_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def later_median(result: Comparison, seeds: Sequence[int]) -> float | None:
    later = [result.seconds[s] for s in seeds[1:] if s in result.seconds]
    return statistics.median(later) if later else None


def print_runs(seeds: Sequence[int], results: dict[str, Comparison]) -> None:
    warm, fresh = results["warm"], results["fresh"]
    print("\nseconds per run, from its 'started' line to its 'done' line (its own 'done in')")
    print("run  seed   warm s (printed)   fresh s (printed)")
    for index, seed in enumerate(seeds):
        cells = [
            f"{seconds_text(r.seconds.get(seed)):>7} ({r.printed.get(seed, '-'):>6})"
            for r in (warm, fresh)
        ]
        note = "  first: also loads what later runs find cached" if index == 0 else ""
        print(f"{index + 1:>3}  {seed:>4}   {cells[0]}   {cells[1]}{note}")
    first = seeds[0]
    print(
        f"\nfirst run:              warm {seconds_text(warm.seconds.get(first))} s, "
        f"fresh {seconds_text(fresh.seconds.get(first))} s"
    )
    if len(seeds) > 1:
        print(
            f"median of runs 2..{len(seeds)}:   warm {seconds_text(later_median(warm, seeds))} s, "
            f"fresh {seconds_text(later_median(fresh, seeds))} s"
        )
    for result in (warm, fresh):
        inside = sum(result.seconds.values())
        status = "" if result.returncode == 0 else f", exit status {result.returncode}"
        print(
            f"whole command, {result.mode:>5}: {result.wall_s:.1f} s, of which runs {inside:.1f} s "
            f"and {result.wall_s - inside:.1f} s outside them (Python and Ray start-up, "
            f"report){status}"
        )


def check_results(seeds: Sequence[int], results: dict[str, Comparison]) -> bool:
    """Prints, per seed, whether both modes wrote the same history and best; True if all did."""
    warm, fresh = results["warm"], results["fresh"]
    same = True
    for seed in seeds:
        if seed not in warm.summaries or seed not in fresh.summaries:
            missing = [r.mode for r in (warm, fresh) if seed not in r.summaries]
            print(f"seed {seed}: no summary.json from {' and '.join(missing)}")
            same = False
            continue
        difference = first_difference(warm.summaries[seed], fresh.summaries[seed])
        if difference is not None:
            print(f"seed {seed}: warm and fresh differ at {difference}")
            same = False
    if same:
        print(f"seeds {seeds[0]}..{seeds[-1]}: history and best identical in both modes")
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per mode (seeds 0..N-1)")
    parser.add_argument("--threads", type=int, default=2, help="cores each run uses")
    parser.add_argument("--output", type=Path, help="folder for DIR/warm and DIR/fresh")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs: expected >= 1")
    seeds = list(range(args.runs))
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    ray_costs = measure_ray_overhead(args.threads)
    print(
        f"Ray: start {ray_costs.start_s:.1f} s, a worker {ray_costs.worker_s:.1f} s, "
        f"an empty call's round trip {ray_costs.call_s * 1000:.1f} ms "
        f"(median of {EMPTY_CALLS})",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as scratch:
        output = args.output or Path(scratch)
        results = {}
        for mode in MODES:
            print(f"{mode}: {args.runs} runs into {output / mode} ...", flush=True)
            results[mode] = run_comparison(mode, seeds, output / mode, args.threads)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_runs(seeds, results)
    print()
    same = check_results(seeds, results)
    median = later_median(results["warm"], seeds)
    if median is None:  # a single run: it is the only measure there is
        median = results["warm"].seconds.get(seeds[0])
    fast = median is not None and median <= GOAL_S
    ok = all(r.returncode == 0 and len(r.summaries) == len(seeds) for r in results.values())
    shown = seconds_text(median)
    print(f"\nwarm median {shown} s per run; goal <= {GOAL_S:.0f} s: {verdict(fast)}")
    print(f"identical results in both modes: {verdict(same)}")
    print(f"every run finished in both modes: {verdict(ok)}")
    return overall(
        {
            f"warm median <= {GOAL_S:.0f} s per run": fast,
            "identical results in both modes": same,
            "every run finished": ok,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
