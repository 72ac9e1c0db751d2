"""Paired statistics against a baseline, the report split of a data set's own test split, and the
comparison settings that choose both."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from adaptalign.cli import main
from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.experiments.compare import build_parser
from adaptalign.experiments.compare_settings import resolve_settings, split_overrides
from adaptalign.experiments.paired import (
    paired_csv,
    paired_difference,
    paired_groups,
    paired_table,
    shown_groups,
)
from tests.helpers.command_line import compare_here

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
# t quantiles of the two-sided 95% interval, from a printed table of Student's t
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}


def test_paired_difference_matches_a_hand_computation() -> None:
    # differences 2, 3, 2, 1, 3: mean 2.2, squared deviations sum to 2.8, sd sqrt(0.7)
    paired = paired_difference([0, 1, 2, 3, 4], [3, 5, 4, 2, 6], [1, 2, 2, 1, 3])
    assert paired.differences == (2.0, 3.0, 2.0, 1.0, 3.0)
    assert paired.mean == pytest.approx(2.2)
    standard_error = math.sqrt(0.7) / math.sqrt(5)
    assert paired.half_width == pytest.approx(T_975[4] * standard_error, rel=1e-3)
    assert paired.interval == pytest.approx((2.2 - 1.0388, 2.2 + 1.0388), abs=1e-3)
    assert paired.excludes_zero
    # t = 2.2 / 0.37417 = 5.880 on 4 degrees of freedom: two-sided p between 0.002 and 0.005
    # (the table's 0.995 and 0.999 quantiles are 4.604 and 7.173)
    assert 0.002 < paired.p_value < 0.005


def test_a_difference_whose_interval_holds_zero_is_not_marked() -> None:
    paired = paired_difference([0, 1, 2], [11, 9, 10.5], [10, 10, 10])  # +1, -1, +0.5
    assert paired.mean == pytest.approx(1 / 6)
    assert paired.interval[0] < 0 < paired.interval[1]
    assert not paired.excludes_zero and paired.p_value > 0.5


def test_one_pair_has_no_interval_and_equal_differences_have_no_spread() -> None:
    single = paired_difference([3], [12.0], [10.0])
    assert (single.mean, single.half_width, single.p_value) == (2.0, None, None)
    assert not single.excludes_zero
    shifted = paired_difference([0, 1], [11.0, 12.0], [10.0, 11.0])
    assert (shifted.mean, shifted.interval, shifted.p_value) == (1.0, (1.0, 1.0), 0.0)
    assert shifted.excludes_zero
    level = paired_difference([0, 1], [10.0, 11.0], [10.0, 11.0])
    assert (level.mean, level.p_value, level.excludes_zero) == (0.0, 1.0, False)
    with pytest.raises(ValueError, match="2 seeds, 1 values"):
        paired_difference([0, 1], [1.0], [1.0, 2.0])


def row(name: str, size: str, seed: int, rsum: float | None) -> dict:
    return {"name": name, "train_images": size, "seed": seed, "rsum": rsum}


ROWS = [
    row("base", "100", 0, 100.0),
    row("base", "100", 1, 110.0),
    row("base", "100", 2, 90.0),
    row("base", "200", 0, 150.0),
    row("base", "200", 1, 160.0),
    row("method", "100", 0, 103.0),
    row("method", "100", 1, 112.0),
    row("method", "100", 2, 94.0),
    row("method", "200", 0, 149.0),
    row("method", "200", 2, 170.0),  # the baseline's seed 2 at 200 did not finish
    row("method", "200", 1, 161.0),
]


def test_groups_pair_matching_seeds_of_one_size_and_list_the_rest() -> None:
    groups = paired_groups(ROWS, "base")
    assert [(g["name"], g["train_images"]) for g in groups] == [
        ("method", "100"),
        ("method", "200"),
    ]
    small, large = groups
    assert small["paired"].seeds == (0, 1, 2) and small["paired"].differences == (3.0, 2.0, 4.0)
    assert small["unpaired"] == []
    assert large["paired"].seeds == (0, 1) and large["paired"].differences == (-1.0, 1.0)
    assert large["unpaired"] == [2]
    # seed 2's 170 at size 200 has no baseline to pair with, so it moves nothing
    assert large["paired"].mean == 0.0


def test_the_table_marks_what_the_seeds_support() -> None:
    groups = paired_groups(ROWS, "base")
    lines = paired_table(groups).splitlines()
    assert lines[0] == (
        "| config | train images | pairs | difference | 95% CI | p (paired t) | per seed |"
    )
    small = groups[0]["paired"]  # mean 3, sd 1: half-width 4.303 / sqrt(3)
    low, high = 3 - T_975[2] / math.sqrt(3), 3 + T_975[2] / math.sqrt(3)
    assert lines[2] == (
        f"| method | 100 | 3 | **+3.0** | [{low:+.1f}, {high:+.1f}] | "
        f"{small.p_value:.3f} | 0: +3.0, 1: +2.0, 2: +4.0 |"
    )
    # +-1: interval [-12.7, +12.7], not bold, and the unpaired seed is named
    assert lines[3] == (
        "| method | 200 | 2 | +0.0 | [-12.7, +12.7] | 1.000 | 0: -1.0, 1: +1.0 (unpaired: seed 2) |"
    )
    assert list(csv.DictReader(io.StringIO(paired_csv([("base", groups)]))))[3] == {
        "name": "method",
        "train_images": "200",
        "baseline": "base",
        "seed": "0",
        "difference": "-1.0",
    }


def test_nothing_is_shown_without_two_matched_seeds() -> None:
    one_seed = [row("base", "100", 0, 1.0), row("method", "100", 0, 2.0)]
    assert shown_groups(one_seed, "base") == []
    assert shown_groups(ROWS, None) == []
    assert len(shown_groups(ROWS, "base")) == 2


# ----------------------------------------------------------------------------- settings


def settings_of(*argv: str):
    parser = build_parser()
    own, overrides = split_overrides(list(argv), set())
    return resolve_settings(parser.parse_args(own), overrides)


def test_comparisons_default_to_five_seeds_the_first_config_and_the_test_split() -> None:
    settings = settings_of("--configs", "a.yaml", "b.yaml", "--output", "out")
    assert settings.seeds == [0, 1, 2, 3, 4]
    assert settings.baselines == ["a"] and settings.report_split == "test"
    assert settings.fit_overrides[0] == "--data.report_split=test"
    plain = settings_of(
        "--configs", "a.yaml", "b.yaml", "--output", "out", "--report-split", "none"
    )
    assert plain.report_split is None and "--data.report_split=test" not in plain.fit_overrides
    chosen = settings_of("--configs", "a.yaml", "b.yaml", "--output", "o", "--baseline", "b")
    assert chosen.baselines == ["b"]
    both = settings_of("--configs", "a.yaml", "b.yaml", "--output", "o", "--baseline", "b", "a")
    assert both.baselines == ["b", "a"]


def test_a_file_can_turn_paired_statistics_off(tmp_path: Path) -> None:
    spec = tmp_path / "c.yaml"
    spec.write_text("configs: [a.yaml, b.yaml]\noutput: out\nbaseline: null\nseeds: [0]\n")
    settings = settings_of("--config", str(spec))
    assert settings.baselines == [] and settings.seeds == [0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--baseline", "c"],
            "adaptalign: error: compare: baseline 'c': expected one of the configs' names "
            "['a', 'b']",
        ),
        (
            ["--baseline", "a", "--seeds", "3"],
            "adaptalign: error: compare: baseline 'a': paired statistics need at least 2 seeds; "
            "got seeds [3]",
        ),
    ],
)
def test_a_baseline_that_cannot_be_paired_is_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--configs", TINY, TINY, "--names", "a", "b", "--output", "out", *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message


def test_reporting_on_the_selection_split_is_refused(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "c.yaml"
    spec.write_text(f"configs: [{TINY}]\noutput: out\nreport_split: val\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--config", str(spec), "--dry-run"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "adaptalign: error: compare: report_split 'val' is the selection split (each run "
        "selects its checkpoint on val); expected 'test', or null to report the selection figure"
    )


# ----------------------------------------------------------------------------- data


def test_the_data_refuses_val_as_report_split_and_an_empty_report_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"report_split='val'.*selection split"):
        AlignmentDataModule(report_split="val")
    generated = GeneratedConfig(num_train=8, num_val=4, num_test=0, image_size=32)
    data = AlignmentDataModule(generated=generated, cache_dir=str(tmp_path), report_split="test")
    with pytest.raises(ConfigurationError) as error:
        data.setup("fit")
    assert str(error.value).startswith("data.report_split=test: ")
    assert "has no test split to report on" in str(error.value)
    assert "data.selection_images" in str(error.value)


def test_a_data_set_with_a_test_split_reports_on_it(tmp_path: Path) -> None:
    generated = GeneratedConfig(num_train=8, num_val=4, num_test=6, image_size=32)
    plain = AlignmentDataModule(generated=generated, cache_dir=str(tmp_path))
    plain.setup("fit")
    assert plain.reports_on is None and plain.report_splits() is None
    data = AlignmentDataModule(generated=generated, cache_dir=str(tmp_path), report_split="test")
    data.setup("fit")
    assert data.reports_on == "test"
    assert data.report_splits() == {
        "selected_on": "val",
        "selection_images": 4,
        "reported_on": "test",
        "report_images": 6,
        "report_source": "the data set's test split",
    }


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_comparison_reports_the_test_split_with_paired_differences(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two configs, 2 seeds: every run is selected on val and reported on the data set's own test
    split, and the paired table's differences are the report rsums' differences seed by seed.

    The second config collapses: a fixed temperature of 10^4 divides every cosine similarity to
    about 0, so each InfoNCE row is a uniform softmax with loss log(batch) at every step. Its runs
    are flagged in the table, listed, and kept in the means and the paired statistics."""
    monkeypatch.setenv("ADAPTALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flat = tmp_path / "flat.yaml"
    flat.write_text(
        "model:\n  temperature: 10000\n  temperature_bounds: [0.01, 10000]\n"
        "  learn_temperature: false\n"
    )
    output = tmp_path / "out"
    args = ["--configs", TINY, f"{TINY}+{flat}", "--names", "base", "flat", "--jobs", "2"]
    _, printed, err = compare_here(output, tiny_text_model, args)
    header = (
        "selected on val (selection split, 16 images), "
        "reported on test (the data set's test split, 16 images)"
    )
    assert f"\n{header}:\n| config |" in printed, printed + err
    with (output / "results.csv").open() as handle:
        rows = {(r["name"], r["seed"]): r for r in csv.DictReader(handle)}
    for (name, seed), r in rows.items():
        summary = json.loads(
            (output / "runs" / name / "nall" / f"seed{seed}" / "summary.json").read_text()
        )
        assert summary["report"]["split"] == "test"
        assert float(r["rsum"]) == pytest.approx(summary["report"]["rsum"])
    with (output / "paired.csv").open() as handle:
        paired = list(csv.DictReader(handle))
    assert [(p["name"], p["baseline"], p["seed"]) for p in paired] == [
        ("flat", "base", "0"),
        ("flat", "base", "1"),
    ]
    for p in paired:
        expected = float(rows[("flat", p["seed"])]["rsum"]) - float(
            rows[("base", p["seed"])]["rsum"]
        )
        assert float(p["difference"]) == pytest.approx(expected, abs=1e-5)
    results = (output / "results.md").read_text()
    assert "## Paired differences\n\nPaired differences in rsum against `base`" in results
    assert "| flat | all | 2 |" in results
    assert "Paired differences in rsum against `base`" in printed
    # The collapsed runs: flagged at their one epoch, listed with the sign that fired, in the means
    for seed in ("0", "1"):
        row = rows[("flat", seed)]
        assert (row["collapsed"], row["collapse_epochs"]) == ("True", "0")
        assert row["collapse_signs"].startswith("loss at log N (epoch 0)")
        assert (
            f"- flat, all training images, seed {seed}: epoch 0; {row['collapse_signs']}; "
            "still flagged at its last epoch"
        ) in results.splitlines()
        assert f"flat n=all seed={seed} done in" in printed and "COLLAPSED at epoch 0" in printed
    # the learning runs' loss leaves log N (after one epoch the tiny model may still rank at
    # chance, which is flagged as such)
    assert all("loss at log N" not in rows[("base", seed)]["collapse_signs"] for seed in "01")
    flat_line = next(line for line in results.splitlines() if line.startswith("| flat | all | 2 |"))
    assert flat_line.endswith("| seed 0 (epoch 0); seed 1 (epoch 0) |")
    mean = (float(rows[("flat", "0")]["rsum"]) + float(rows[("flat", "1")]["rsum"])) / 2
    assert f"| {mean:.1f} ± " in flat_line  # both collapsed seeds are in the mean


def test_several_baselines_give_a_table_each() -> None:
    from adaptalign.experiments.paired import paired_sections, paired_text

    sections = paired_sections(ROWS, ["base", "method", "absent"])
    assert [b for b, _ in sections] == ["base", "method"]  # nothing pairs with "absent"
    text = paired_text(sections)
    assert text.index("against `base`") < text.index("against `method`")
    assert "| base | 100 | 3 | **-3.0** |" in text  # the same pairs, seen from the other side
    rows = list(csv.DictReader(io.StringIO(paired_csv(sections))))
    assert [(r["baseline"], r["name"]) for r in rows].count(("method", "base")) == 5
