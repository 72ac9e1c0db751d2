"""Collapsed runs are flagged in a comparison's results with their epochs, and kept in the means."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
import yaml

from adaptalign.experiments import report
from adaptalign.experiments.collapse_flags import (
    collapse_columns,
    collapse_section,
    epoch_ranges,
    epochs_words,
)
from adaptalign.experiments.compare_results import (
    aggregate,
    csv_text,
    markdown_table,
    report_markdown,
    summary_row,
)

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
RECALLS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")


def epoch_record(epoch: int, loss: bool, rsum: bool) -> dict:
    """One flagged epoch as CollapseWatch writes it into ``collapse_epochs``."""
    return {
        "epoch": epoch,
        "loss_at_chance": loss,
        "loss_gap": 0.0 if loss else -0.3,
        "rsum": 0.0 if rsum else 50.0,
        "chance_rsum": 40.0,
        "rsum_at_chance": rsum,
    }


def summary(recall: float, collapsed: bool | None, records: list[dict] | None = None) -> dict:
    """A finished run whose best validation has every R@K equal to ``recall``; ``collapsed``
    ``None`` leaves out the collapse keys, as a run that did not watch."""
    best = {m: recall for m in RECALLS} | {"epoch": 2, "step": 6, "rsum": 6 * recall}
    written = {"best": best, "last": best, "history": [best], "train_size": 16, "seed": 0}
    if collapsed is not None:
        written |= {"collapsed": collapsed, "collapse_epochs": records or []}
    return written


# Config a: seed 1 collapsed from epoch 4 to the end, seed 2 flagged at epoch 0 only and came back;
# config b: watched, never flagged.
SEED1 = [epoch_record(e, loss=True, rsum=e >= 6) for e in range(4, 10)]
SEED2 = [epoch_record(0, loss=False, rsum=True)]
ROWS = [
    summary_row("a", "16", 0, summary(10.0, False)),
    summary_row("a", "16", 1, summary(1.0, True, SEED1)),
    summary_row("a", "16", 2, summary(12.0, False, SEED2)),
    summary_row("b", "all", 0, summary(20.0, False)),
]


def test_epoch_ranges_and_words() -> None:
    assert epoch_ranges([7, 0, 2, 3, 4, 3]) == "0, 2-4, 7"
    assert epoch_ranges([]) == ""
    assert epochs_words("4") == "epoch 4"
    assert epochs_words("4-9") == "epochs 4-9"
    assert epochs_words("0, 2") == "epochs 0, 2"


def test_a_row_keeps_every_flagged_epoch_not_only_the_last() -> None:
    """``collapsed`` in the summary is the last epoch's flag; the row also names earlier ones."""
    assert (ROWS[1]["collapsed"], ROWS[1]["collapse_epochs"]) == (True, "4-9")
    assert ROWS[1]["collapse_signs"] == "loss at log N (epochs 4-9); rsum at chance (epochs 6-9)"
    # Flagged at epoch 0 only: not collapsed at the end, yet its epoch is kept.
    assert (ROWS[2]["collapsed"], ROWS[2]["collapse_epochs"]) == (False, "0")
    assert ROWS[2]["collapse_signs"] == "rsum at chance (epoch 0)"
    assert (ROWS[0]["collapsed"], ROWS[0]["collapse_epochs"], ROWS[0]["collapse_signs"]) == (
        False,
        "",
        "",
    )
    unwatched = summary_row("c", "16", 0, summary(5.0, None))
    assert (unwatched["collapsed"], unwatched["collapse_epochs"]) == (None, "")
    # Every flagged epoch, both signs, in any order.
    both = collapse_columns(
        {"collapsed": False, "collapse_epochs": [epoch_record(3, True, True), SEED2[0]]}
    )
    assert both["collapse_epochs"] == "0, 3"
    assert both["collapse_signs"] == "loss at log N (epoch 3); rsum at chance (epochs 0, 3)"


def test_the_table_names_flagged_seeds_and_keeps_them_in_the_means() -> None:
    table = markdown_table(aggregate(ROWS)).splitlines()
    assert table[0].endswith("| rsum 95% CI | rsum (last epoch) | collapsed |")
    a, b = table[2], table[3]
    assert a.endswith("| seed 1 (epochs 4-9); seed 2 (epoch 0) |")
    assert b.endswith("| - |")
    # The collapsed seed is in the means: i2t R@1 over 10, 1 and 12, rsum over 60, 6 and 72.
    for values in ([10.0, 1.0, 12.0], [60.0, 6.0, 72.0]):
        mean, std = statistics.mean(values), statistics.stdev(values)
        assert f"| {mean:.1f} ± {std:.1f} |" in a
    assert a.startswith("| a | 16 | 3 | 7.7 ± 5.9 |")


def test_runs_that_did_not_watch_keep_the_table_as_it_was() -> None:
    unwatched = [summary_row("c", "16", s, summary(5.0 + s, None)) for s in (0, 1)]
    table = markdown_table(aggregate(unwatched))
    assert "collapsed" not in table
    assert "## Collapsed runs" not in report_markdown(aggregate(unwatched))
    # Mixed in one table: the group says how many of its runs were not watched.
    mixed = markdown_table(aggregate([*unwatched, ROWS[3], {**ROWS[1], "name": "c"}])).splitlines()
    assert mixed[2].endswith("| seed 1 (epochs 4-9); 2 not watched |")
    assert mixed[3].endswith("| - |")


def test_the_report_lists_each_flagged_run_with_its_epochs_and_why() -> None:
    markdown = report_markdown(aggregate(ROWS))
    assert "they are kept in the means" in markdown.split("| config |")[0]
    section = markdown[markdown.index("## Collapsed runs") :]
    assert "kept in the means" in section and "bias a config's mean upward" in section
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert lines == [
        "- a, 16 training images, seed 1: epochs 4-9; loss at log N (epochs 4-9); rsum at chance "
        "(epochs 6-9); still flagged at its last epoch",
        "- a, 16 training images, seed 2: epoch 0; rsum at chance (epoch 0); not flagged at its "
        "last epoch",
    ]
    assert markdown.endswith(lines[-1] + "\n")
    nothing = [ROWS[0], ROWS[3]]
    assert collapse_section(aggregate(nothing)) == ""
    assert "## Collapsed runs" not in report_markdown(aggregate(nothing))
    assert "they are kept in the means" in report_markdown(aggregate(nothing))  # column shown


def test_rows_read_back_from_the_csv_give_the_same_flags() -> None:
    """Only a summary's ``collapsed: True`` is known: the run is flagged at its last epoch."""
    rows = [*ROWS, summary_row("b", "all", 1, {**summary(20.0, None), "collapsed": True})]
    read = list(csv.DictReader(io.StringIO(csv_text(rows))))
    assert read[1]["collapse_epochs"] == "4-9" and read[1]["collapsed"] == "True"
    assert [r["collapse_epochs"] for r in read] == ["", "4-9", "0", "", ""]
    assert collapse_section(aggregate(read)) == collapse_section(aggregate(rows))
    table = markdown_table(aggregate(read)).splitlines()
    assert table[3].endswith("| seed 1 (last epoch) |")
    assert "- b, all training images, seed 1: its last epoch; still flagged at its last epoch" in (
        collapse_section(aggregate(read))
    )


# ----------------------------------------------------------------------------- adaptalign report


def test_the_results_document_lists_flagged_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text("{}\n")
    comparison = {
        "configs": [{"name": "fixed", "config": "a.yaml"}],
        "seeds": [0, 1],
        "train_images": [100],
        "output": "out",
    }
    (tmp_path / "done.yaml").write_text(yaml.safe_dump(comparison))
    for seed, written in ((0, summary(10.0, False)), (1, summary(1.0, True, SEED1))):
        folder = tmp_path / "out/runs/fixed/n100" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(written))
    section = report.Section("done", "Done", Path("done.yaml"))
    body = report.render_section(section, tmp_path / "figures", tmp_path)
    assert "| rsum (last epoch) | collapsed |" in body
    assert "| fixed | 100 | 2 |" in body and "| seed 1 (epochs 4-9) |" in body
    assert "Collapsed runs. " in body and "kept in the means" in body
    assert (
        "- fixed, 100 training images, seed 1: epochs 4-9; loss at log N (epochs 4-9); rsum at "
        "chance (epochs 6-9); still flagged at its last epoch"
    ) in body.splitlines()


# ----------------------------------------------------------------------------- a real run


# A real comparison with collapsed runs: tests/test_paired.py (one comparison checks both).


def test_the_progress_line_says_when_a_run_collapsed(tmp_path: Path) -> None:
    from adaptalign.experiments.compare_runs import Run, headline

    run = Run("a", "a.yaml", 16, 0, tmp_path)
    best = {"epoch": 9, "rsum": 12.0, "i2t_R@1": 1.0, "t2i_R@1": 2.0}
    records = [{"epoch": e, "loss_at_chance": True} for e in (4, 5, 6)]
    summary = {"best": best, "collapsed": True, "collapse_epochs": records}
    run.summary_path.write_text(json.dumps(summary))
    assert headline(run) == "i2t R@1 1.0, t2i R@1 2.0, rsum 12.0, COLLAPSED at epochs 4-6"
    run.summary_path.write_text(json.dumps({"best": best, "collapsed": False}))
    assert headline(run) == "i2t R@1 1.0, t2i R@1 2.0, rsum 12.0"
