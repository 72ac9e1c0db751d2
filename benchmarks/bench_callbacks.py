"""Training-step time of the system with and without the adaptive callbacks.

    python benchmarks/bench_callbacks.py [--steps 24] [--repeats 5] [--batch-size 16]

The system and batches of ``bench_train_step.py`` (quick start towers, AlignmentModule, Lightning's
loop with TensorBoard logging), fitted without an adaptive callback, with each per-step callback
alone (variance loss weights, MM-TS temperatures, ARL) and with the three together. The TOnICS
curriculum acts once per epoch, on the sampler, and costs nothing per step.
Fits alternate within every repeat, and the order flips from one repeat to the next, so machine
noise and drift hit every variant alike; the median seconds per step and each variant's ratio to
the plain system are printed, with the ratio of the fastest repeats beside it (the least disturbed
by other work on the machine). A few per cent is within the run-to-run noise of a busy machine, so
the goal (<= 1.03x, a callback's cost at most 3 % of a plain step) is judged on the time spent
inside each callback's own hooks, clocked per step: a direct, low-noise measure of the same
overhead. The end-to-end ratios are printed beside it for reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from bench_train_step import make_batches, time_lightning
from goals import overall, verdict

from adaptalign.callbacks.arl import ARL
from adaptalign.callbacks.loss_weighting import LossWeighting
from adaptalign.callbacks.temperature_schedule import TemperatureSchedule
from adaptalign.datamodules.clusters import tercile_bounds

GOAL = 1.03
CLUSTERS = 8


class HookClock:
    """Mixin: adds the seconds spent in the callback's batch hooks to ``hook_seconds``."""

    hook_seconds = 0.0
    hook_steps = 0

    def on_train_batch_start(self, *args: object) -> None:
        start = time.perf_counter()
        super().on_train_batch_start(*args)  # type: ignore[misc]
        self.hook_seconds += time.perf_counter() - start

    def on_train_batch_end(self, *args: object) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args)  # type: ignore[misc]
        self.hook_seconds += time.perf_counter() - start
        self.hook_steps += 1


class TimedLossWeighting(HookClock, LossWeighting):
    pass


class TimedTemperatureSchedule(HookClock, TemperatureSchedule):
    pass


class TimedARL(HookClock, ARL):
    pass


def mmts() -> TimedTemperatureSchedule:
    schedule = TimedTemperatureSchedule()
    # What on_fit_start reads from the data module's clustering; here the batches carry the sizes.
    schedule.size_range = (10, 10 * CLUSTERS)
    schedule.bucket_bounds = tercile_bounds(np.arange(10, 10 * CLUSTERS + 1, 10))
    return schedule


def every_callback() -> list[L.Callback]:
    return [
        mmts(),
        TimedLossWeighting(signal="variance"),
        TimedARL(num_clusters=CLUSTERS, warmup_epochs=0),
    ]


VARIANTS: dict[str, Callable[[], list[L.Callback]]] = {
    "none": list,
    "loss_weighting(variance)": lambda: [TimedLossWeighting(signal="variance")],
    "mmts_temperature": lambda: [mmts()],
    "arl": lambda: [TimedARL(num_clusters=CLUSTERS, warmup_epochs=0)],
    "all_three": every_callback,
}


def with_clusters(batches: list[dict]) -> list[dict]:
    """The caption-cluster ids and sizes MM-TS and ARL read, as the data module would add them."""
    for batch in batches:
        rows = len(batch["texts"])
        batch["cluster"] = torch.arange(rows) % CLUSTERS
        batch["cluster_size"] = 10 * (1 + batch["cluster"])
    return batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = 2  # first steps pay for allocation
    batches = with_clusters(make_batches(args.steps + skip, args.batch_size))
    names = list(VARIANTS)
    times: dict[str, list[float]] = {name: [] for name in names}
    hooks: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            callbacks = VARIANTS[name]()
            times[name].append(time_lightning(batches, skip, callbacks, log_every_n_steps=5))
            clocked = [c for c in callbacks if isinstance(c, HookClock)]
            hooks[name].append(sum(c.hook_seconds / c.hook_steps for c in clocked))
        row = "  ".join(f"{name} {times[name][-1]:.3f}" for name in names)
        print(f"repeat {r + 1} (s/step): {row}")
    base, best = statistics.median(times["none"]), min(times["none"])
    print(f"\nwithout adaptive callbacks: median {base:.3f} s/step, fastest {best:.3f}")
    goals = {}
    for name in names[1:]:
        median = statistics.median(times[name])
        ratio = median / base
        hook = statistics.median(hooks[name])
        cost = 1 + hook / base  # the step time the callbacks' own work adds up to
        goals[f"{name} <= {GOAL:.2f}x"] = cost <= GOAL
        print(
            f"{name}: hooks {1e3 * hook:.2f} ms/step = {cost:.3f}x a plain step (goal <= "
            f"{GOAL:.2f}: {verdict(cost <= GOAL)}); end to end median {median:.3f} s/step, "
            f"ratio {ratio:.3f}, fastest-repeat ratio {min(times[name]) / best:.3f}"
        )
    return overall(goals)


if __name__ == "__main__":
    sys.exit(main())
