"""One trial of a tuning study: an ``adaptalign fit`` per seed, like a comparison's runs.

Each seed of a trial is a :class:`Run` in ``OUTPUT/trials/<trial>/seed<seed>`` with its own log,
summary and checkpoints, so a study that was interrupted skips what finished and continues what
did not, as a comparison does. The trial runs in its Ray Tune worker's process (a warm worker)
and reports after every validation, so ASHA can stop a poor trial early: the score reported is
the mean over the trial's seeds so far of each seed's best value of the metric yet (the same
best-epoch selection as a comparison). Runs that need processes of their own (several devices)
run in one and report their validations when they end.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from adaptalign.experiments.compare_runs import Run, execute, fit_command
from adaptalign.experiments.in_process import needs_own_process
from adaptalign.experiments.tune_settings import Study

SCORE = "score"  # what Tune optimises: see the module docstring
REPORT_CALLBACK = "adaptalign.experiments.tune_trial.EpochReport"


@dataclass
class Scoreboard:
    """The trial's seeds so far and what it reports to Tune after each validation."""

    metric: str
    mode: str
    send: Callable[[dict[str, Any]], None]
    bests: list[float] = field(default_factory=list)  # of the seeds that ended
    current: float | None = None
    stopped: bool = False

    def better(self, a: float, b: float | None) -> float:
        if b is None:
            return a
        return max(a, b) if self.mode == "max" else min(a, b)

    def validation(self, seed: int, epoch: int, value: float) -> None:
        self.current = self.better(value, self.current)
        values = [*self.bests, self.current]
        score = sum(values) / len(values)
        metrics = {SCORE: score, "seed": seed, "epoch": epoch, "value": value}
        try:
            self.send(metrics)
        except SystemExit:  # Tune ends a stopped trial's thread this way
            self.stopped = True
            raise

    def seed_done(self) -> None:
        if self.current is not None:
            self.bests.append(self.current)
        self.current = None


BOARD: Scoreboard | None = None  # the trial running in this worker, for its callback


class EpochReport(L.Callback):
    """Hands each validation's metric to the trial running in this process."""

    def __init__(self, metric: str = "val/rsum", seed: int = 0) -> None:
        self.metric, self.seed = metric, seed

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or BOARD is None or self.metric not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.metric])
        BOARD.validation(self.seed, trainer.current_epoch, value)


def seed_runs(study: Study, trial: str) -> list[Run]:
    folder = study.output / "trials" / trial
    return [
        Run(trial, study.base, study.train_images, seed, folder / f"seed{seed}")
        for seed in study.seeds
    ]


def run_trial(
    study: Study,
    trial: str,
    config: dict[str, Any],
    send: Callable[[dict[str, Any]], None],
    warm: bool,
    gpus: float,
) -> Scoreboard:
    """Every seed of one trial, reporting through ``send``.

    When Tune stops the trial, ``send`` raises ``SystemExit`` in the fit's validation; the fit
    ends there (its run stays unfinished) and the trial ends with the same ``SystemExit``, which
    is how Tune's worker knows the trial ended and takes the next one.
    """
    global BOARD
    board = Scoreboard(study.metric, study.mode, send)
    setting = [*study.overrides, *study.fit_arguments(config)]
    for run in seed_runs(study, trial):
        if run.finished():  # from before an interruption: its validations count as they were
            replay(board, run, study.metric)
            board.seed_done()
            continue
        # a trial selects: it never evaluates a report split (a carved selection's dev)
        report = ["--data.report_split=none", f"--trainer.callbacks+={REPORT_CALLBACK}"]
        report += [
            f"--trainer.callbacks.metric={study.metric}",
            f"--trainer.callbacks.seed={run.seed}",
        ]
        here = warm and not needs_own_process(fit_command(run, setting), gpus)
        BOARD = board if here else None
        try:
            outcome = execute(run, [*setting, *report], in_process=here)
        finally:
            BOARD = None
        if board.stopped:  # end the trial the way Tune stops it, so its worker takes the next
            raise SystemExit(0)
        if not outcome.ok:
            tail = "\n".join(outcome.log_tail[-5:])
            raise RuntimeError(f"{run.label}: {outcome.reason}; log {run.log_path}\n{tail}")
        if not here:
            replay(board, run, study.metric)
        board.seed_done()
    return board


def replay(board: Scoreboard, run: Run, metric: str) -> None:
    """Reports a finished run's validations from its summary, in order."""
    history = json.loads(run.summary_path.read_text()).get("history") or []
    name = metric.removeprefix("val/")
    for entry in history:
        if name in entry:
            board.validation(run.seed, int(entry["epoch"]), float(entry[name]))


def trial_name(context: Any) -> str:
    return str(context.get_trial_id())


def tune_function(study: Study, warm: bool, gpus: float) -> Callable[[dict[str, Any]], None]:
    """The function Ray Tune runs for each trial, in the command's working directory (relative
    paths mean what they mean there, and its modules import, as under ``python -m``)."""
    cwd = str(Path.cwd())

    def trial(config: dict[str, Any]) -> None:
        from ray import tune

        os.chdir(cwd)
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        run_trial(study, trial_name(tune.get_context()), config, tune.report, warm, gpus)

    return trial
