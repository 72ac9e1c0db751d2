"""``adaptalign tune STUDY.yaml``: hyperparameter search with Ray Tune, Optuna's TPE and ASHA.

Each trial is a set of ``adaptalign fit`` runs (one per seed of the study) placed like a
comparison's runs (:mod:`adaptalign.experiments.ray_pool`); Optuna's TPE sampler proposes the
settings and ASHA stops trials that trail at a validation. Everything the file names is checked
before the first trial: the file itself (:mod:`adaptalign.experiments.tune_settings`), and every
hyperparameter against ``fit``'s own options. The study lives in ``OUTPUT/study`` (Tune's state,
Optuna's included) and ``OUTPUT/trials`` (the runs): the same command again continues it. It ends
with ``trials.csv``, ``best.yaml`` (a config layer for ``fit`` and ``compare``) and ``tuning.png``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adaptalign.common.arguments import CommandParser
from adaptalign.common.atomic_files import atomic_save
from adaptalign.common.errors import ConfigurationError
from adaptalign.experiments.compare_runs import format_duration
from adaptalign.experiments.compare_settings import config_parts
from adaptalign.experiments.ray_pool import (
    Placement,
    Share,
    add_placement_arguments,
    placed_share,
    placement_from,
    ray_session,
)
from adaptalign.experiments.tune_results import Trial, write_outputs
from adaptalign.experiments.tune_settings import Study, read_study
from adaptalign.experiments.tune_trial import SCORE, seed_runs, tune_function

EXPERIMENT = "study"
# A worker whose trial ASHA stopped is handed the next trial once the stopped fit has noticed,
# at its next validation; Tune's default wait (2 s) would fail the next trial instead.
# Trials run where the command runs (relative config and output paths), not in Tune's folders.
WORKER_ENV = {"TUNE_FUNCTION_THREAD_TIMEOUT_S": "3600", "RAY_CHDIR_TO_TRIAL_DIR": "0"}


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="adaptalign tune",
        description="Tune a config's hyperparameters with Ray Tune (Optuna TPE + ASHA); "
        "re-running the same command continues the study.",
        allow_abbrev=False,
    )
    parser.add_argument("study", metavar="STUDY.yaml", help="the tuning file")
    parser.add_argument("--output", metavar="DIR", help="folder of the study (default: the file's)")
    parser.add_argument("--trials", type=int, help="trial budget (default: the file's)")
    parser.add_argument(
        "--train-images", metavar="N", help="training images of every trial (default: the file's)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check the study and print its plan; run nothing"
    )
    add_placement_arguments(parser)
    return parser


def check_keys(study: Study) -> None:
    """Every hyperparameter must be a ``fit`` option that takes the values of its range.

    ``fit --print_config`` with the base config, the overrides and one value of each range
    parses everything and instantiates nothing; its one-line error names the bad key.
    """
    sample = {d.key: d.sample_value() for d in study.space}
    layers = [arg for part in config_parts(study.base) for arg in ("--config", part)]
    command = [sys.executable, "-m", "adaptalign", "fit", *layers, *study.overrides]
    command += [*study.fit_arguments(sample), "--print_config"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit {done.returncode}"
        reason = last.removeprefix("adaptalign: error: ")
        raise ConfigurationError(f"{study.path}: space or base config refused by fit: {reason}")


def check_study(study: Study) -> None:
    missing = [p for p in config_parts(study.base) if not Path(p).is_file()]
    if missing:
        raise ConfigurationError(f"{study.path}: base config file(s) not found: {missing}")
    check_keys(study)
    recorded = study.output / "tuning.yaml"
    text = study.path.read_text()
    if recorded.is_file() and recorded.read_text() != text:
        raise ConfigurationError(
            f"{study.output} holds a study of another tuning file ({recorded} differs from "
            f"{study.path}); give another --output, or delete the folder to start afresh"
        )


def progress_callback(study: Study, slots: int) -> Any:
    """Tune callback: one line per trial start and end, with counts and an ETA."""
    from ray.tune import Callback

    class Lines(Callback):
        def __init__(self) -> None:
            self.started: dict[str, float] = {}
            self.durations: list[float] = []
            self.numbers: dict[str, int] = {}

        def label(self, trial: Any) -> str:
            number = self.numbers.setdefault(trial.trial_id, len(self.numbers) + 1)
            return f"[trial {number}/{study.trials}] {trial.trial_id}"

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started[trial.trial_id] = time.monotonic()
            setting = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in trial.config.items()
            )
            print(f"{self.label(trial)} started: {setting}", flush=True)

        def ended(self, trial: Any, trials: list, text: str) -> None:
            took = time.monotonic() - self.started.get(trial.trial_id, time.monotonic())
            self.durations.append(took)
            running = sum(t.status == "RUNNING" and t is not trial for t in trials)
            ended = len(self.durations)
            waiting = max(study.trials - ended - running, 0)
            eta = ""
            if waiting + running and len(self.durations) > 1:
                # the mean, not the median: trials ASHA stops early are part of what is to come
                mean = sum(self.durations[1:]) / (len(self.durations) - 1)  # the first warms up
                eta = f"; ETA {format_duration(mean * (waiting + running) / slots)}"
            print(
                f"{self.label(trial)} {text} in {format_duration(took)}; "
                f"{ended} ended, {running} running, {waiting} waiting{eta}",
                flush=True,
            )

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            score = (trial.last_result or {}).get(SCORE)
            finished = all(run.finished() for run in seed_runs(study, trial.trial_id))
            state = "done" if finished else "stopped early by ASHA"
            said = f" ({study.metric} score {score:.2f})" if score is not None else ""
            self.ended(trial, trials, f"{state}{said}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.ended(trial, trials, "FAILED (see its seed logs under trials/)")

    return Lines()


def tuner(study: Study, share: Share, placement: Placement) -> Any:
    """A new study, or the one in ``OUTPUT/study`` continued."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    function = tune_function(study, placement.warm, share.gpus)
    trainable = tune.with_resources(function, {"cpu": share.cpus, "gpu": share.gpus})
    storage = study.output.resolve()
    if tune.Tuner.can_restore(str(storage / EXPERIMENT)):
        print(f"continuing the study in {storage / EXPERIMENT}", flush=True)
        return tune.Tuner.restore(
            str(storage / EXPERIMENT), trainable, resume_unfinished=True, resume_errored=True
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=study.sampler_seed)
    searcher = OptunaSearch(sampler=sampler, metric=SCORE, mode=study.mode)
    if study.early_stopping is None:
        scheduler: Any = FIFOScheduler()
    else:
        scheduler = ASHAScheduler(
            grace_period=study.early_stopping.grace_period,
            reduction_factor=study.early_stopping.reduction_factor,
            max_t=10**9,  # trials end by themselves, after their last seed's last epoch
        )
    return tune.Tuner(
        trainable,
        param_space={d.key: d.tune_domain() for d in study.space},
        tune_config=tune.TuneConfig(
            metric=SCORE,
            mode=study.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=study.trials,
            max_concurrent_trials=share.slots,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(storage),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=1),  # a lost machine: once more
            callbacks=[progress_callback(study, share.slots)],
        ),
    )


def trials_of(study: Study, results: Any) -> list[Trial]:
    trials = []
    for result in results:
        metrics = result.metrics or {}
        folder = Path(result.path).name  # trial_<name>_<number>_...: what the trial really is
        name = str(metrics.get("trial_id") or "")
        if not name or name not in folder:
            name = folder
        runs = seed_runs(study, name)
        if result.error is not None:
            status = "failed"
        elif all(run.finished() for run in runs):
            status = "complete"
        else:
            status = "stopped early"
        score = metrics.get(SCORE)
        trials.append(
            Trial(
                name,
                dict(result.config or {}),
                None if score is None else float(score),
                int(metrics.get("training_iteration") or 0),
                status,
            )
        )
    return trials


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    path = Path(options.study)
    study = read_study(path, options.output, options.trials, options.train_images)
    placement = placement_from(options)
    check_study(study)
    if options.dry_run:
        print(
            f"{study.path}: {study.trials} trials over {[d.key for d in study.space]}, seeds "
            f"{list(study.seeds)}, base {study.base}; output {study.output}"
        )
        return 0
    study.output.mkdir(parents=True, exist_ok=True)
    atomic_save(study.output / "tuning.yaml", path.read_text())
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # runs keep their own logs
    # A trial continued after an interruption reports its finished validations again.
    warnings.filterwarnings("ignore", message="The reported value is ignored because")
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)  # a Ray this process already runs, as in the tests
    with ray_session(placement.address, WORKER_ENV) as ray:
        share = placed_share(ray, placement)
        print(
            f"{study.trials} trials of {shlex.quote(str(path))}; Ray places them: "
            f"{share.describe()}",
            flush=True,
        )
        results = tuner(study, share, placement).fit()
    trials = trials_of(study, results)
    best = write_outputs(study, trials)
    ended = {s: sum(t.status == s for t in trials) for s in ("complete", "stopped early", "failed")}
    print(f"\n{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in ended.items()))
    if best is None:
        print(f"no trial completed; wrote {study.output / 'trials.csv'}", file=sys.stderr)
        return 1
    print(f"best: trial {best.name}, {study.metric} score {best.score:.2f}: {best.config}")
    print(f"wrote {study.output / 'trials.csv'}, best.yaml and tuning.png")
    return 1 if ended["failed"] else 0
