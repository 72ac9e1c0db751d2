"""The results of a comparison: per-run rows, their spread over seeds, a table and a plot.

Pure functions from rows (one per finished run) to statistics, text and image bytes, so each
figure can be checked by hand; :func:`write_results` alone touches files, each written atomically.

A run with a selection split (``data.selection_images``) contributes its report: the checkpoint
selected on val (the selection split) evaluated once on test (the report split); its row says so
in ``selected_on`` and ``reported_on``, and the table's header names the splits.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adaptalign.common.atomic_files import atomic_save
from adaptalign.common.figures import new_figure, png_bytes
from adaptalign.experiments.collapse_flags import (
    collapse_cell,
    collapse_columns,
    collapse_note,
    collapse_section,
    group_collapse,
    shows_collapse,
)
from adaptalign.experiments.paired import paired_csv, paired_text
from adaptalign.experiments.seed_stats import Stat, describe
from adaptalign.lightning_modules.metric_names import (
    GROUPS,
    RECALLS,
    RSUM,
    group_name,
    recall_name,
)
from adaptalign.lightning_modules.metric_names import METRICS as RUN_METRICS  # one run's metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Recall of queries from the tail, middle and head caption clusters (runs with clusters only).
BUCKET_METRICS = tuple(
    group_name(g, m) for g in GROUPS for m in (recall_name("i2t", 1), recall_name("t2i", 1), RSUM)
)
METRICS = (*RUN_METRICS, *BUCKET_METRICS)
CSV_FIELDS = (
    "name",
    "train_images",
    "seed",
    "train_size",
    "best_epoch",
    *METRICS,
    "last_epoch",
    "last_rsum",
    "wall_seconds",
    "collapsed",
    "collapse_epochs",
    "collapse_signs",
)
TABLE_METRICS = (*RECALLS, RSUM)
# Columns added to the CSV when a run was reported on a split apart from its selection split.
REPORT_FIELDS = ("selected_on", "reported_on", "selection_rsum")


def split_words(splits: dict[str, Any]) -> tuple[str, str]:
    """``val (selection split, 1000 images carved from train)`` and ``test (dev, 1000 images)``:
    which split a report's run was selected on and reported on, from its summary's ``splits``;
    a data set's own val and test splits read ``val (selection split, 250 images)`` and
    ``test (the data set's test split, 250 images)``."""
    carved = f" carved from {splits['carved_from']}" if splits.get("carved_from") else ""
    selected = (
        f"{splits.get('selected_on', 'val')} (selection split, "
        f"{splits.get('selection_images', '?')} images{carved})"
    )
    reported = (
        f"{splits.get('reported_on', 'test')} ({splits.get('report_source', 'dev')}, "
        f"{splits.get('report_images', '?')} images)"
    )
    return selected, reported


def summary_row(name: str, train_images: str, seed: int, summary: dict) -> dict[str, Any]:
    """One CSV row from a run's ``summary.json``: its best validation by rsum, last rsum, time,
    whether its last epoch was flagged as collapsed (empty when the run did not watch), and
    every epoch flagged with why (:func:`~adaptalign.experiments.collapse_flags.collapse_columns`).

    A summary with a ``report`` gives the report split's metrics instead, of the epoch selected
    on the selection split (``best_epoch``), that epoch's selection rsum and the splits' names.
    """
    best = summary.get("best") or {}
    last = summary.get("last") or {}
    report = summary.get("report")
    scored = report or best
    row: dict[str, Any] = {
        "name": name,
        "train_images": train_images,
        "seed": seed,
        "train_size": summary.get("train_size"),
        "best_epoch": scored.get("epoch"),
    }
    row.update({metric: scored.get(metric) for metric in METRICS})
    if report:
        row["selected_on"], row["reported_on"] = split_words(report.get("splits") or {})
        row["selection_rsum"] = best.get("rsum") if report.get("checkpoint") else last.get("rsum")
    row["last_epoch"] = last.get("epoch")
    row["last_rsum"] = last.get("rsum")
    row["wall_seconds"] = summary.get("wall_seconds")
    row.update(collapse_columns(summary))
    return row


def aggregate(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups rows by (name, train_images), in first-seen order, and describes each metric.

    Runs flagged as collapsed stay in the statistics; ``collapse`` names them.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["name"], str(row["train_images"])), []).append(row)
    result = []
    for (name, train_images), members in groups.items():
        stats: dict[str, Stat] = {}
        for metric in (*METRICS, "last_rsum"):
            values = [float(r[metric]) for r in members if r.get(metric) not in (None, "")]
            if values:
                stats[metric] = describe(values)
        sizes = [int(r["train_size"]) for r in members if r.get("train_size") not in (None, "")]
        result.append(
            {
                "name": name,
                "train_images": train_images,
                "train_size": int(np.median(sizes)) if sizes else None,
                "seeds": [int(r["seed"]) for r in members],
                "stats": stats,
                "collapse": group_collapse(members),
            }
        )
    return result


def format_stat(stat: Stat | None, digits: int = 1) -> str:
    if stat is None:
        return "-"
    if stat.std is None:
        return f"{stat.mean:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"


def format_interval(stat: Stat | None, digits: int = 1) -> str:
    if stat is None:
        return "-"
    interval = stat.interval
    if interval is None:
        return f"n={stat.n}"
    return f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def metric_label(metric: str) -> str:
    """A table header for a metric key: ``tail/i2t_R@1`` reads ``tail i→t R@1``."""
    return metric.replace("/", " ").replace("_", " ").replace("i2t", "i→t").replace("t2i", "t→i")


def markdown_table(groups: Sequence[dict[str, Any]]) -> str:
    """One row per (config, training size): mean ± std over seeds and rsum's 95% interval;
    when runs watched for a collapse, the seeds flagged at any epoch (kept in the means)."""
    collapse = shows_collapse(groups)
    header = ["config", "train images", "seeds"]
    header += [metric_label(m) for m in TABLE_METRICS]
    header += ["rsum 95% CI", "rsum (last epoch)"] + (["collapsed"] if collapse else [])
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    for group in groups:
        stats = group["stats"]
        cells = [group["name"], group["train_images"], str(len(group["seeds"]))]
        cells += [format_stat(stats.get(metric)) for metric in TABLE_METRICS]
        cells += [format_interval(stats.get("rsum")), format_stat(stats.get("last_rsum"))]
        cells += [collapse_cell(group)] if collapse else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bucket_table(groups: Sequence[dict[str, Any]]) -> str:
    """Head/middle/tail recall per (config, training size); empty when no run has clusters."""
    shown = [g for g in groups if any(m in g["stats"] for m in BUCKET_METRICS)]
    if not shown:
        return ""
    header = ["config", "train images", "seeds"]
    header += [metric_label(m) for m in BUCKET_METRICS]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    for group in shown:
        cells = [group["name"], group["train_images"], str(len(group["seeds"]))]
        cells += [format_stat(group["stats"].get(metric)) for metric in BUCKET_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def splits_line(rows: Sequence[dict[str, Any]]) -> str | None:
    """Which split the numbers are on, when runs were reported apart from their selection split:
    ``selected on val (...), reported on test (...)``; ``None`` when every run selected and
    reported on val (the wording stays that of such comparisons). Runs that differ are counted."""
    protocols: dict[str, int] = {}
    for row in rows:
        if row.get("reported_on"):
            words = f"selected on {row['selected_on']}, reported on {row['reported_on']}"
        else:
            words = "selected and reported on val"
        protocols[words] = protocols.get(words, 0) + 1
    if set(protocols) <= {"selected and reported on val"}:
        return None
    if len(protocols) == 1:
        return next(iter(protocols))
    counted = "; ".join(f"{n} run{'' if n == 1 else 's'} {words}" for words, n in protocols.items())
    return f"the runs differ in their splits: {counted}"


def splits_intro(splits: str) -> str:
    """What the numbers of runs reported apart from their selection split are."""
    return (
        f"Retrieval in %, {splits}. Each run's checkpoint is the best by rsum on the selection "
        "split, evaluated once on the report split, which nothing reads before the selection is "
        "made; the last column is the last epoch's rsum on the selection split."
    )


def report_markdown(groups: Sequence[dict[str, Any]], splits: str | None = None) -> str:
    """The report; ``splits`` (:func:`splits_line`) when runs were reported on their own split."""
    buckets = bucket_table(groups)
    if buckets:
        buckets = (
            "\n## Head, middle and tail queries\n\n"
            "The same best validation, with queries split by the size of their caption's "
            "cluster (terciles of the training cluster sizes; an image counts where most of its "
            "captions fall). Validation captions join their nearest training cluster.\n\n" + buckets
        )
    if splits is None:
        intro = (
            "Retrieval on the validation split, in %; each run contributes its best validation "
            "by rsum. That is model selection on the evaluation split itself (a dev figure, "
            "slightly optimistic); the last column is the last epoch's rsum."
        )
    else:
        buckets = buckets.replace("The same best validation", "The same report")
        intro = splits_intro(splits)
    return (
        "# Comparison\n\n"
        f"{intro} Cells are mean ± sample standard deviation (ddof=1) over seeds; the interval "
        "is the 95% Student-t interval of the mean rsum. A single seed shows its value and "
        f"`n=1`.{collapse_note(groups)}\n\n"
        + markdown_table(groups)
        + buckets
        + collapse_section(groups)
    )


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV; with :data:`REPORT_FIELDS` when any run was reported on its own split."""
    fields = CSV_FIELDS
    if any(row.get("reported_on") for row in rows):
        fields = (*CSV_FIELDS, *REPORT_FIELDS)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    return buffer.getvalue()


PANELS = (
    ("rsum", "rsum (epoch selected on val)"),
    ("t2i_R@1", "t→i R@1 (%, epoch selected on val)"),
)


def config_colour(index: int, count: int) -> str | tuple[float, ...]:
    """Matplotlib's 10 default colours, or its 20-colour table for more configs, so that no two
    configs of one plot share a colour."""
    if count <= 10:
        return f"C{index}"
    from matplotlib import colormaps

    return tuple(colormaps["tab20"](index % 20))


CONFIG_MARKERS = ("o", "s", "^", "D")


def config_marker(index: int) -> str:
    """A circle for the first 20 configs, then another shape per 20: past the 20-colour table,
    two lines of one colour still tell apart."""
    return CONFIG_MARKERS[(index // 20) % len(CONFIG_MARKERS)]


def legend_below(figure: Figure) -> None:
    """One legend for all panels, under them: inside a panel it would cover points."""
    handles, labels = [], []
    for axes in figure.axes:
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))


def results_figure(groups: Sequence[dict[str, Any]], title: str) -> Figure:
    """rsum and t→i R@1 with their 95% intervals: against training images when the comparison
    has several sizes (one line per config), else one category per config."""
    sizes = sorted({x for g in groups if (x := _x_value(g)) is not None})
    names = list(dict.fromkeys(g["name"] for g in groups))
    figure = new_figure(10, 4.6, "constrained")  # room for the titles and the legend below
    panels = figure.subplots(1, 2)
    for axis, (metric, label) in zip(panels, PANELS, strict=True):
        if len(sizes) > 1:
            _lines_over_sizes(axis, groups, names, metric, sizes)
        else:
            _categories(axis, groups, names, metric, sizes)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    if len(sizes) > 1:
        legend_below(figure)
    figure.suptitle(f"{title}\nmean over seeds, 95% t-interval")
    return figure


def _lines_over_sizes(
    axis: Axes,
    groups: Sequence[dict[str, Any]],
    names: Sequence[str],
    metric: str,
    sizes: Sequence[float],
) -> None:
    """One line per config over the training sizes, on a log axis ticked at the sizes only."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    for index, name in enumerate(names):
        dodge = 1.02 ** (index - (len(names) - 1) / 2)  # keep overlapping bars apart
        points = sorted(
            (x * dodge, stat.mean, stat.half_width or 0.0)
            for g in groups
            if g["name"] == name
            and (stat := g["stats"].get(metric)) is not None
            and (x := _x_value(g)) is not None
        )
        if points:
            xs, means, errors = (list(v) for v in zip(*points, strict=True))
            axis.errorbar(
                xs,
                means,
                yerr=errors,
                marker=config_marker(index),
                capsize=3,
                label=name,
                color=config_colour(index, len(names)),
            )
    if min(sizes) > 0:
        axis.set_xscale("log")
    axis.xaxis.set_major_locator(FixedLocator(list(sizes)))
    axis.xaxis.set_major_formatter(FixedFormatter([f"{x:,.0f}" for x in sizes]))
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_xlabel("training images")


def _categories(
    axis: Axes,
    groups: Sequence[dict[str, Any]],
    names: Sequence[str],
    metric: str,
    sizes: Sequence[float],
) -> None:
    """One point per config at its own category position, labelled with the config's name."""
    for index, name in enumerate(names):
        stat = next((g["stats"].get(metric) for g in groups if g["name"] == name), None)
        if stat is not None:
            axis.errorbar(
                [index],
                [stat.mean],
                yerr=[stat.half_width or 0.0],
                marker="o",
                capsize=4,
                color=config_colour(index, len(names)),
            )
    if len(names) > 3:  # slanted and anchored at their ends, so long names do not overlap
        axis.set_xticks(range(len(names)), names, rotation=40, ha="right", rotation_mode="anchor")
    else:
        axis.set_xticks(range(len(names)), names)
    axis.set_xlim(-0.5, len(names) - 0.5)
    size = f" ({sizes[0]:,.0f} training images)" if sizes else ""
    axis.set_xlabel(f"config{size}")


def plot_png(groups: Sequence[dict[str, Any]], title: str) -> bytes:
    """:func:`results_figure` as PNG bytes."""
    return png_bytes(results_figure(groups, title), dpi=120)


def _x_value(group: dict[str, Any]) -> float | None:
    """The training set's actual size when the runs recorded it, else the requested count."""
    if group.get("train_size") is not None:
        return float(group["train_size"])
    try:
        return float(group["train_images"])
    except ValueError:
        return None


def write_results(
    output: Path,
    rows: Sequence[dict[str, Any]],
    title: str | None = None,
    paired: Sequence[tuple[str, Sequence[dict[str, Any]]]] = (),
) -> list[dict[str, Any]]:
    """Writes ``results.csv``, ``results.md`` and ``results.png``; returns the groups.

    With ``paired`` (:func:`~adaptalign.experiments.paired.paired_sections` of the rows),
    ``results.md`` ends with the paired differences against each baseline and ``paired.csv``
    keeps each seed's difference. The plot's title is ``title``, by default the comparison's
    output folder name.
    """
    groups = aggregate(rows)
    output.mkdir(parents=True, exist_ok=True)
    atomic_save(output / "results.csv", csv_text(rows))
    splits = splits_line(rows)
    markdown = report_markdown(groups, splits)
    if paired:
        markdown += f"\n## Paired differences\n\n{paired_text(paired)}"
        atomic_save(output / "paired.csv", paired_csv(paired))
    atomic_save(output / "results.md", markdown)
    title = title or output.resolve().name
    atomic_save(output / "results.png", plot_png(groups, f"{title}\n{splits}" if splits else title))
    return groups
