"""What a study leaves: the trial table, the best setting as a config layer, and a plot.

Only trials that ran every epoch of every seed compete for the best setting: a trial ASHA
stopped early scored fewer validations, and its partial score is not comparable.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from adaptalign.common.atomic_files import atomic_save
from adaptalign.common.figures import new_figure, save_png
from adaptalign.experiments.tune_settings import Study, overlay, plain


@dataclass(frozen=True)
class Trial:
    """One trial as the study ended it."""

    name: str
    config: dict[str, Any]
    score: float | None
    validations: int
    status: str  # "complete", "stopped early" or "failed"


def complete(trials: Sequence[Trial]) -> list[Trial]:
    return [t for t in trials if t.status == "complete" and t.score is not None]


def best_trial(trials: Sequence[Trial], mode: str) -> Trial | None:
    ranked = complete(trials)
    if not ranked:
        return None
    return (max if mode == "max" else min)(ranked, key=lambda t: t.score)


def table_csv(study: Study, trials: Sequence[Trial]) -> str:
    keys = [d.key for d in study.space]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trial", "status", *keys, "score", "validations"])
    for trial in trials:
        score = "" if trial.score is None else f"{trial.score:.4f}"
        values = [plain(trial.config.get(k, "")) for k in keys]
        writer.writerow([trial.name, trial.status, *values, score, trial.validations])
    return out.getvalue()


def overlay_yaml(study: Study, best: Trial) -> str:
    """The best setting as a config layer for ``fit --config`` or a comparison's config list."""
    seeds = ", ".join(map(str, study.seeds))
    size = "all" if study.train_images is None else study.train_images
    header = [
        f"# Tuned by adaptalign tune {study.path} ({len(study.seeds)} seed(s): {seeds}; "
        f"train images: {size}):",
        f"# trial {best.name}, {study.metric} {best.score:.2f} (mean over seeds of the best epoch,",
        "# on the split the base config validates on). Layer it last on the base config:",
        f"#   adaptalign fit --config {' --config '.join(study.base.split('+'))} --config THIS",
    ]
    body = yaml.safe_dump(overlay(best.config), sort_keys=False)
    return "\n".join(header) + "\n" + body


def write_outputs(study: Study, trials: Sequence[Trial]) -> Trial | None:
    """``trials.csv``, ``best.yaml`` (when a trial completed) and ``tuning.png``; the best."""
    output = study.output
    atomic_save(output / "trials.csv", table_csv(study, trials))
    best = best_trial(trials, study.mode)
    if best is not None:
        atomic_save(output / "best.yaml", overlay_yaml(study, best))
    save_png(tuning_figure(study, trials, best), output / "tuning.png")
    return best


def tuning_figure(study: Study, trials: Sequence[Trial], best: Trial | None) -> Any:
    """The score against each hyperparameter; stopped trials hollow, the best one starred."""
    from matplotlib.ticker import NullFormatter

    count = len(study.space)
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    figure = new_figure(4.0 * columns, 3.2 * rows + 0.8, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    scored = [t for t in trials if t.score is not None]
    for ax, dimension in zip(axes, study.space, strict=False):
        for kind, filled in (("complete", True), ("stopped early", False)):
            points = [t for t in scored if t.status == kind]
            xs = [position(dimension, t.config.get(dimension.key)) for t in points]
            ys = [t.score for t in points]
            face = "tab:blue" if filled else "none"
            ax.scatter(xs, ys, facecolors=face, edgecolors="tab:blue", label=kind)
        if best is not None:
            ax.scatter(
                [position(dimension, best.config.get(dimension.key))],
                [best.score],
                marker="*",
                s=180,
                color="tab:orange",
                label="best (complete trials)",
                zorder=3,
            )
        if dimension.kind == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: no overlaps
        if dimension.kind == "choice":
            ax.set_xticks(range(len(dimension.values)), [str(v) for v in dimension.values])
        ax.set_xlabel(dimension.key)
        ax.set_ylabel(f"{study.metric} (trial score)")
        ax.grid(alpha=0.3)
    for ax in axes[count:]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    figure.suptitle(
        f"{study.path.name}: {len(trials)} trials; score = mean over {len(study.seeds)} seed(s) "
        f"of the best-epoch {study.metric}\nhollow: stopped early by ASHA (partial score)",
        fontsize="medium",
    )
    return figure


def position(dimension: Any, value: Any) -> float:
    """Where a value sits on its axis; a choice's options sit at 0, 1, 2, ..."""
    if dimension.kind == "choice":
        return float(list(dimension.values).index(value))
    return float(value)
