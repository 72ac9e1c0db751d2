"""``adaptalign report``: the results document and the README summary, rebuilt from the runs."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from adaptalign.cli import main
from adaptalign.experiments import report

METRICS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")
README = """# project

Text before.

## Results

{begin}
old tables
{end}

## After

Text after.
"""


def write_summary(folder: Path, recall: float, size: int) -> float:
    """A finished run whose best validation has every R@K equal to ``recall``; returns its rsum."""
    folder.mkdir(parents=True)
    best = {m: recall for m in METRICS} | {"epoch": 2, "rsum": 6 * recall}
    best |= {"tail/i2t_R@1": recall + 1, "tail/t2i_R@1": recall, "tail/rsum": 6 * recall + 1}
    summary = {"best": best, "last": best, "history": [best], "train_size": size}
    (folder / "summary.json").write_text(json.dumps(summary))
    return 6 * recall


def write_stress(folder: Path, rsums: dict[float, float]) -> None:
    (folder / "stress_both").mkdir()
    entries = [
        {"rate": rate, "rsum": value} | {m: value / 6 for m in METRICS}
        for rate, value in rsums.items()
    ]
    (folder / "stress_both" / "stress.json").write_text(json.dumps(entries))


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two comparisons (one with two seeds finished and noise results, one never run)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text("{}\n")
    done = {
        "configs": [{"name": "fixed", "config": "a.yaml"}, {"name": "mine", "config": "a.yaml"}],
        "seeds": [0, 1, 2],
        "train_images": [100],
        "output": "out/done",
        "stress_rates": [0, 0.5],
    }
    never = {"configs": ["a.yaml"], "seeds": [0], "output": "out/never"}
    (tmp_path / "done.yaml").write_text(yaml.safe_dump(done))
    (tmp_path / "never.yaml").write_text(yaml.safe_dump(never))
    for name, recalls in (("fixed", (10.0, 20.0)), ("mine", (30.0, 32.0))):
        for seed, recall in enumerate(recalls):
            folder = tmp_path / "out/done/runs" / name / "n100" / f"seed{seed}"
            rsum = write_summary(folder, recall, 100)
            write_stress(folder, {0.0: rsum, 0.5: rsum / 2})
    sections = [
        {
            "name": "done",
            "title": "Done here",
            "comparison": "done.yaml",
            "intro": "The setting.",
            "findings": "What we saw.",
            "summary": "Mine beats fixed\nby 16 rsum.",
        },
        {"name": "never", "title": "Never run", "comparison": "never.yaml"},
    ]
    (tmp_path / "report.yaml").write_text(
        yaml.safe_dump(
            {
                "readme": "README.md",
                "results": "docs/RESULTS.md",
                "figures": "docs/results",
                "preamble": "How to read the tables.",
                "sections": sections,
            }
        )
    )
    (tmp_path / "README.md").write_text(README.format(begin=report.BEGIN, end=report.END))
    return tmp_path


def run_report(*args: str) -> int:
    try:
        return main(["report", "--config", "report.yaml", *args])
    except SystemExit as exc:
        return exc.code


def test_report_writes_the_document_and_only_the_readme_summary(project: Path) -> None:
    assert run_report() == 0
    text = (project / "README.md").read_text()
    before, rest = text.split(report.BEGIN)
    summary, after = rest.split(report.END)
    assert before == README.split("{begin}")[0]
    assert after == README.split("{end}")[1]
    assert "old tables" not in summary
    # One line per comparison, linked to its section of the document; people's summary on one line.
    assert "| [Done here](docs/RESULTS.md#done-here) | Mine beats fixed by 16 rsum. |" in summary
    assert "| [Never run](docs/RESULTS.md#never-run) | see the section |" in summary

    generated = (project / "docs/RESULTS.md").read_text()
    assert generated.startswith("# Results\n") and "How to read the tables." in generated
    assert "- [Done here](#done-here)" in generated
    # Means and sample standard deviations over the finished seeds, computed by hand.
    fixed_rsum = statistics.mean([60.0, 120.0]), statistics.stdev([60.0, 120.0])
    assert "| fixed | 100 | 2 | 15.0 ± 7.1 |" in generated
    assert f"{fixed_rsum[0]:.1f} ± {fixed_rsum[1]:.1f}" in generated  # 90.0 ± 42.4
    assert "| mine | 100 | 2 | 31.0 ± 1.4 |" in generated
    # Two of three seeds per config: the section says the comparison is partial.
    assert "**Partial:** 4 of 6 runs have finished." in generated
    assert "Head, middle and tail queries" in generated and "| 16.0 ± 7.1 |" in generated
    # Noise: rsum per rate, halved at 0.5.
    assert "| rsum at 0 | rsum at 0.5 |" in generated
    assert "| fixed | 100 | 2 | 90.0 ± 42.4 | 45.0 ± 21.2 |" in generated
    assert "evaluated on the validation split (val) with noise at each rate" in generated
    # Paired against the first config: mine - fixed is 180 - 60 = 120 (seed 0) and 192 - 120 = 72
    # (seed 1), mean 96, standard error 24; t = 4 on 1 degree of freedom (a Cauchy distribution):
    # p = 1 - 2 atan(4) / pi = 0.156, and the interval is 96 -+ 12.706 x 24.
    assert "Paired differences in rsum against `fixed`" in generated
    assert (
        "| mine | 100 | 2 | +96.0 | [-208.9, +400.9] | "
        f"{1 - 2 * math.atan(4) / math.pi:.3f} | 0: +120.0, 1: +72.0 |"
    ) in generated
    # People's words around the numbers, in order, and both plots written and linked from the
    # document's own folder.
    order = [
        generated.index(s)
        for s in (
            "<!-- section: done -->",
            "## Done here",
            "The setting.",
            "| fixed",
            "What we saw.",
        )
    ]
    assert order == sorted(order)
    for png in ("done.png", "done_stress.png"):
        assert (project / "docs/results" / png).stat().st_size > 1000
        assert f"(results/{png})" in generated
    # A comparison with no finished run keeps its section and says how to produce it.
    never = generated[generated.index("## Never run") :]
    assert "adaptalign compare --config never.yaml" in never
    assert "Not run yet: 0 of 1 runs have finished." in never and "| config |" not in never

    # Rebuilding from the same runs changes nothing, byte for byte.
    assert run_report() == 0
    assert (project / "README.md").read_text() == text
    assert (project / "docs/RESULTS.md").read_text() == generated


def test_plots_are_titled_with_their_section(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    titles = []

    def record(draw):
        def drawing(*args):
            titles.append((draw.__name__, args[-1]))
            return draw(*args)

        return drawing

    monkeypatch.setattr(report, "plot_png", record(report.plot_png))
    monkeypatch.setattr(report, "stress_plot", record(report.stress_plot))
    assert run_report() == 0
    assert titles == [("plot_png", "Done here"), ("stress_plot", "Done here")]


@pytest.mark.slow
def test_only_rebuilds_the_named_sections_and_keeps_the_others(project: Path) -> None:
    assert run_report() == 0
    document = project / "docs/RESULTS.md"
    # Another machine's numbers for "never", and stale ones for "done".
    edited = document.read_text().replace("Not run yet: 0 of 1 runs have finished.", "KEPT TABLE")
    document.write_text(edited.replace("| mine | 100 | 2 | 31.0 ± 1.4 |", "| mine | stale |"))
    assert run_report("--only", "done") == 0
    text = document.read_text()
    assert "KEPT TABLE" in text and "Not run yet" not in text
    assert "| mine | 100 | 2 | 31.0 ± 1.4 |" in text and "stale" not in text
    # Without --only every section is rebuilt from the runs here.
    assert run_report() == 0
    assert "KEPT TABLE" not in document.read_text()


def test_print_leaves_the_files_alone(project: Path, capsys) -> None:
    assert run_report("--print") == 0
    assert "## Done here" in capsys.readouterr().out
    assert "old tables" in (project / "README.md").read_text()
    assert not (project / "docs/RESULTS.md").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: (p / "README.md").write_text("# no markers\n"), "expected the markers"),
        (
            lambda p: (p / "report.yaml").write_text(
                "sections:\n  - {name: x, title: X, comparison: missing.yaml}\n"
            ),
            r"sections\[0\]: comparison 'missing.yaml' does not exist",
        ),
        (
            lambda p: (p / "report.yaml").write_text(
                "sections:\n  - {name: x, comparison: done.yaml, colour: red}\n"
            ),
            r"sections\[0\]: unknown keys \['colour'\], missing keys \['title'\]",
        ),
        (
            lambda p: (p / "report.yaml").write_text(
                "readme: README.md\nsection: []\nsections: []\n"
            ),
            r"report file 'report.yaml': unknown keys \['section'\]",
        ),
    ],
    ids=["no-markers", "missing-comparison", "bad-keys", "bad-file-key"],
)
def test_bad_input_names_the_file_and_field(project: Path, change, message: str, capsys) -> None:
    change(project)
    assert run_report() == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("adaptalign: error:")
    assert __import__("re").search(message, err), err


def test_only_an_unknown_section_is_refused(project: Path, capsys) -> None:
    assert run_report("--only", "done", "nevr") == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "adaptalign: error: --only ['nevr']: no such section; expected among ['done', 'never']"
    )
    assert not (project / "docs/RESULTS.md").exists()


def test_a_section_of_runs_reported_apart_from_their_selection_says_which_split_is_which(
    project: Path,
) -> None:
    splits = {
        "selected_on": "val",
        "selection_images": 40,
        "carved_from": "train",
        "split_seed": 0,
        "reported_on": "test",
        "report_images": 20,
        "report_source": "dev",
    }
    for path in (project / "out/done/runs").rglob("summary.json"):
        summary = json.loads(path.read_text())
        report_entry = summary["best"] | {"split": "test", "selected_on": "val", "splits": splits}
        path.write_text(json.dumps(summary | {"report": report_entry}))
    assert run_report("--only", "done") == 0
    document = (project / "docs/RESULTS.md").read_text()
    assert (
        "Retrieval in %, selected on val (selection split, 40 images carved from train), "
        "reported on test (dev, 20 images). Each run's checkpoint" in document
    )


def test_a_plot_of_many_configs_gives_each_its_own_colour() -> None:
    from adaptalign.experiments.compare_results import aggregate, results_figure

    rows = [
        {"name": f"c{i}", "train_images": size, "seed": 0, "rsum": float(i), "t2i_R@1": 1.0}
        for i in range(12)
        for size in ("100", "200")
    ]
    figure = results_figure(aggregate(rows), "twelve")
    lines = [container.lines[0] for container in figure.axes[0].containers]
    colours = {str(line.get_color()) for line in lines}
    assert len(lines) == 12
    assert len(colours) == 12
    assert figure.axes[0].get_ylabel() == "rsum (epoch selected on val)"
