"""The noise stress test inside a comparison: each finished run's best checkpoint under noise.

After the fits, ``adaptalign compare --stress-rates 0 0.1 0.3`` runs ``adaptalign stress`` on every
finished run that has no stress result yet (so re-running resumes here too), with the run's own
saved config and its best checkpoint, and reports mean ± std over seeds per config, training size
and noise rate (``results_stress.md``, ``results_stress.csv``, ``results_stress.png``). A run with
a report split (``data.selection_images`` or ``data.report_split``) is stressed on it (``test``),
any other on ``val``; the outputs say which, and results on different splits are never averaged.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptalign.common.atomic_files import atomic_save
from adaptalign.common.figures import new_figure, png_bytes
from adaptalign.experiments.compare_results import (
    TABLE_METRICS,
    config_colour,
    config_marker,
    describe,
    format_stat,
    legend_below,
    metric_label,
)
from adaptalign.experiments.compare_runs import Run, size_label
from adaptalign.experiments.ray_pool import Placement, worker_pool
from adaptalign.experiments.stress import split_words

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STRESS_METRICS = TABLE_METRICS
NOISE_WORDS = {"text": "caption", "image": "image", "both": "caption and image"}
LINE_STYLES = ("-", "--", ":")  # one per split, should a comparison's runs differ in split


def stress_folder(run: Run, modality: str) -> Path:
    return run.folder / f"stress_{modality}"


def stress_command(run: Run, rates: Sequence[float], modality: str) -> list[str] | None:
    """``adaptalign stress`` on the run's saved config and best checkpoint; None if missing."""
    configs = sorted(run.folder.glob("version_*/config.yaml"))
    checkpoints = sorted(run.folder.glob("version_*/checkpoints/best-*.ckpt"))
    if not configs or not checkpoints:
        return None
    return [
        sys.executable,
        "-m",
        "adaptalign",
        "stress",
        "--config",
        str(configs[-1]),
        "--ckpt_path",
        str(checkpoints[-1]),
        "--rates",
        *(f"{r:g}" for r in rates),
        "--modality",
        modality,
        "--output",
        str(stress_folder(run, modality)),
        "--trainer.enable_progress_bar=false",
    ]


def stress_process(command: list[str], log: Path) -> int:
    """One ``adaptalign stress`` in a process of its own, on a worker; its exit status."""
    with log.open("w") as out:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode


def run_stress(
    runs: Sequence[Run], rates: Sequence[float], modality: str, placement: Placement
) -> list[Run]:
    """Stress-tests finished runs without a result, placed like the fits; returns the failures."""
    failed = []
    todo = []
    for run in (r for r in runs if r.finished() and not _result(r, modality).is_file()):
        command = stress_command(run, rates, modality)
        if command is None:
            print(f"[stress] {run.label}: no config or best checkpoint")
            failed.append(run)
        else:
            todo.append((run, command))
    if not todo:
        return failed
    with worker_pool(placement) as pool:
        logs = {id(item): item[0].folder / f"stress_{modality}.log" for item in todo}
        count = started = 0
        for event in pool.run(todo, stress_process, lambda item: (item[1], logs[id(item)])):
            run = event.item[0]
            if event.kind == "started":
                started += 1
                where = f"[stress {started}/{len(todo)}] {run.label} ({modality} noise)"
                print(f"{where} on {event.where}", flush=True)
                continue
            count += 1
            code = event.value if event.value is not None else -1
            if code != 0 or not _result(run, modality).is_file():
                log = logs[id(event.item)]
                print(f"[stress {count}/{len(todo)}] {run.label}: failed (exit {code}); log {log}")
                failed.append(run)
            else:
                print(f"[stress {count}/{len(todo)}] {run.label}: done", flush=True)
    return failed


def _result(run: Run, modality: str) -> Path:
    return stress_folder(run, modality) / "stress.json"


def stress_rows(runs: Sequence[Run], modality: str) -> list[dict[str, Any]]:
    """One row per (run, rate) from the finished stress results, with the split they are on
    (``val`` for results that do not say, written before the report split was stressed)."""
    rows = []
    for run in runs:
        path = _result(run, modality)
        if not path.is_file():
            continue
        for entry in json.loads(path.read_text()):
            row = {
                "name": run.name,
                "train_images": size_label(run.train_images),
                "seed": run.seed,
                "rate": float(entry["rate"]),
                "split": entry.get("split", "val"),
            }
            row.update({m: entry.get(m) for m in STRESS_METRICS})
            rows.append(row)
    return rows


def aggregate_stress(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (config, training size, rate, split), in first-seen order."""
    groups: dict[tuple[str, str, float, str], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["name"], row["train_images"], row["rate"], row.get("split", "val"))
        groups.setdefault(key, []).append(row)
    return [
        {
            "name": name,
            "train_images": size,
            "rate": rate,
            "split": split,
            "seeds": len(members),
            "stats": {
                m: describe([float(r[m]) for r in members])
                for m in STRESS_METRICS
                if all(r.get(m) is not None for r in members)
            },
        }
        for (name, size, rate, split), members in groups.items()
    ]


def stress_splits(groups: Sequence[dict[str, Any]]) -> list[str]:
    """The splits the results are on, in first-seen order (one, unless runs differ)."""
    return list(dict.fromkeys(g.get("split", "val") for g in groups))


def stress_markdown(groups: Sequence[dict[str, Any]], modality: str) -> str:
    splits = stress_splits(groups)
    mixed = len(splits) > 1  # then each row names its split
    header = ["config", "train images", *(["split"] if mixed else []), "noise rate", "seeds"]
    header += [metric_label(m) for m in STRESS_METRICS]
    align = ["---", "---", *(["---"] if mixed else []), "---:", "---:"]
    lines = [
        f"# Noise stress test ({modality} noise)\n",
        f"Each run's best checkpoint evaluated on {' or '.join(map(split_words, splits))} with "
        "noise at each rate; mean ± std over seeds, in %.\n",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(align + ["---:"] * len(STRESS_METRICS)) + " |",
    ]
    ordered = sorted(
        groups, key=lambda g: (g["train_images"], g["name"], g.get("split", "val"), g["rate"])
    )
    for group in ordered:
        cells = [group["name"], group["train_images"]]
        cells += [group.get("split", "val")] if mixed else []
        cells += [f"{group['rate']:g}", str(group["seeds"])]
        cells += [format_stat(group["stats"].get(m)) for m in STRESS_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stress_figure(groups: Sequence[dict[str, Any]], modality: str, title: str) -> Figure:
    """rsum against noise rate, one line per config, one panel per training size.

    The title names the split unless it is ``val`` throughout; should runs differ in split, each
    config has a line per split, labelled with it.
    """
    sizes = list(dict.fromkeys(g["train_images"] for g in groups))
    names = list(dict.fromkeys(g["name"] for g in groups))
    splits = stress_splits(groups)
    # at least 10 inches: room for the two-line title and a legend of many configs
    figure = new_figure(max(5 * len(sizes), 10), 4.4, "constrained")
    for panel, size in enumerate(sizes):
        axes = figure.add_subplot(1, len(sizes), panel + 1)
        mine = [g for g in groups if g["train_images"] == size and "rsum" in g["stats"]]
        for (index, name), (style, split) in itertools.product(enumerate(names), enumerate(splits)):
            line = sorted(
                (g for g in mine if g["name"] == name and g.get("split", "val") == split),
                key=lambda g: g["rate"],
            )
            if not line:
                continue
            stats = [g["stats"]["rsum"] for g in line]
            axes.errorbar(
                [g["rate"] for g in line],
                [s.mean for s in stats],
                yerr=[s.std or 0.0 for s in stats],
                marker=config_marker(index),
                capsize=3,
                label=f"{name} ({split})" if len(splits) > 1 else name,
                color=config_colour(index, len(names)),  # the same in every panel
                linestyle=LINE_STYLES[style % len(LINE_STYLES)],
            )
        axes.set_xlabel(f"noise rate ({NOISE_WORDS.get(modality, modality)})")
        axes.set_ylabel("rsum (mean ± std over seeds)")
        axes.set_title(f"{size} train images")
        axes.grid(alpha=0.3)
    legend_below(figure)
    where = "" if set(splits) <= {"val"} else f" on {' and '.join(map(split_words, splits))}"
    noise = NOISE_WORDS.get(modality, modality)
    figure.suptitle(f"{title}\nretrieval{where} under {noise} noise")
    return figure


def stress_plot(groups: Sequence[dict[str, Any]], modality: str, title: str) -> bytes:
    """:func:`stress_figure` as PNG bytes."""
    return png_bytes(stress_figure(groups, modality, title), dpi=100)


def write_stress_report(
    output: Path, runs: Sequence[Run], modality: str, title: str | None = None
) -> bool:
    """The stress results' CSV, table and plot (titled ``title``, by default the comparison's
    output folder name); False when no run has a stress result yet."""
    rows = stress_rows(runs, modality)
    if not rows:
        return False
    groups = aggregate_stress(rows)
    buffer = io.StringIO()
    fields = ["name", "train_images", "seed", "rate", "split", *STRESS_METRICS]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_save(output / "results_stress.csv", buffer.getvalue())
    markdown = stress_markdown(groups, modality)
    atomic_save(output / "results_stress.md", markdown)
    plot = stress_plot(groups, modality, title or output.resolve().name)
    atomic_save(output / "results_stress.png", plot)
    print(f"\n{markdown}", flush=True)
    return True
