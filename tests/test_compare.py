"""``adaptalign compare``: statistics checked by hand, the run summary, real tiny comparisons."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.trainer.states import TrainerFn
from matplotlib.backend_bases import RendererBase
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.text import Text
from scipy import stats

from adaptalign.callbacks import run_summary
from adaptalign.callbacks.run_summary import RunSummary
from adaptalign.cli import main as cli_main
from adaptalign.experiments import compare_results
from adaptalign.experiments.compare import build_parser, main, own_options
from adaptalign.experiments.compare_results import (
    aggregate,
    bucket_table,
    describe,
    markdown_table,
    report_markdown,
    results_figure,
    summary_row,
    write_results,
)
from adaptalign.experiments.compare_settings import resolve_settings, split_overrides
from adaptalign.experiments.compare_stress import aggregate_stress, stress_figure
from tests.helpers.builders import COMBINED_METHODS
from tests.helpers.command_line import compare_here

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


# ----------------------------------------------------------------------------- statistics


def test_describe_matches_hand_computation() -> None:
    values = [170.0, 176.25, 181.0]
    mean = (170.0 + 176.25 + 181.0) / 3  # 175.75
    std = math.sqrt(((-5.75) ** 2 + 0.5**2 + 5.25**2) / 2)  # ddof=1
    half = stats.t.ppf(0.975, df=2) * std / math.sqrt(3)
    stat = describe(values)
    assert stat.n == 3
    assert stat.mean == pytest.approx(mean)
    assert stat.std == pytest.approx(std)
    assert stat.half_width == pytest.approx(half)
    assert stat.interval == pytest.approx((mean - half, mean + half))
    single = describe([42.0])
    assert (single.mean, single.std, single.half_width, single.interval) == (42.0, None, None, None)


def row(name: str, size: str, seed: int, recalls: list[float], last_rsum: float) -> dict:
    keys = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
    values = dict(zip(keys, recalls, strict=True))
    return {
        "name": name,
        "train_images": size,
        "seed": seed,
        "train_size": int(size) if size.isdigit() else 48,
        **values,
        "rsum": sum(recalls),
        "last_rsum": last_rsum,
    }


ROWS = [
    row("a", "16", 0, [10, 30, 40, 5, 20, 50], 150),  # rsum 155
    row("a", "16", 1, [12, 30, 44, 6, 25, 50], 160),  # rsum 167
    row("a", "16", 2, [14, 30, 48, 7, 30, 50], 170),  # rsum 179
    row("b", "all", 0, [20, 40, 60, 10, 30, 40], 190),  # rsum 200, a single seed
]


def test_aggregate_groups_by_config_and_size() -> None:
    groups = aggregate(ROWS)
    assert [(g["name"], g["train_images"], g["seeds"]) for g in groups] == [
        ("a", "16", [0, 1, 2]),
        ("b", "all", [0]),
    ]
    a, b = (g["stats"] for g in groups)
    assert a["i2t_R@1"].mean == pytest.approx(12.0) and a["i2t_R@1"].std == pytest.approx(2.0)
    assert a["t2i_R@5"].std == pytest.approx(5.0)
    assert a["rsum"].mean == pytest.approx(167.0) and a["rsum"].std == pytest.approx(12.0)
    half = stats.t.ppf(0.975, df=2) * 12.0 / math.sqrt(3)
    assert a["rsum"].interval == pytest.approx((167.0 - half, 167.0 + half))
    assert b["rsum"].mean == pytest.approx(200.0) and b["rsum"].interval is None
    assert groups[0]["train_size"] == 16 and groups[1]["train_size"] == 48


def test_markdown_table_shows_mean_std_interval_and_seed_count() -> None:
    table = markdown_table(aggregate(ROWS)).splitlines()
    assert table[0].startswith("| config | train images | seeds | i→t R@1 | i→t R@5 |")
    assert "| rsum | rsum 95% CI | rsum (last epoch) |" in table[0]
    half = stats.t.ppf(0.975, df=2) * 12.0 / math.sqrt(3)
    assert table[2] == (
        "| a | 16 | 3 | 12.0 ± 2.0 | 30.0 ± 0.0 | 44.0 ± 4.0 | 6.0 ± 1.0 | 25.0 ± 5.0 | "
        f"50.0 ± 0.0 | 167.0 ± 12.0 | [{167 - half:.1f}, {167 + half:.1f}] | 160.0 ± 10.0 |"
    )
    # One seed: the values alone, and n=1 where the interval would be.
    assert table[3] == (
        "| b | all | 1 | 20.0 | 40.0 | 60.0 | 10.0 | 30.0 | 40.0 | 200.0 | n=1 | 190.0 |"
    )


def test_bucket_table_only_for_runs_with_clusters() -> None:
    assert bucket_table(aggregate(ROWS)) == ""
    assert "Head, middle and tail" not in report_markdown(aggregate(ROWS))
    with_buckets = [
        {**ROWS[0], "tail/i2t_R@1": 4.0, "tail/t2i_R@1": 2.0, "head/rsum": 300.0},
        {**ROWS[1], "tail/i2t_R@1": 6.0, "tail/t2i_R@1": 2.0, "head/rsum": 310.0},
        ROWS[3],
    ]
    table = bucket_table(aggregate(with_buckets)).splitlines()
    assert table[0].startswith("| config | train images | seeds | tail i→t R@1 | tail t→i R@1 |")
    assert len(table) == 3  # config b has no bucket figures and is left out
    # tail i2t: 5.0 ± 1.41; tail t2i 2.0 ± 0.0; middle missing; head rsum 305.0 ± 7.07.
    assert table[2] == (
        "| a | 16 | 2 | 5.0 ± 1.4 | 2.0 ± 0.0 | - | - | - | - | - | - | 305.0 ± 7.1 |"
    )
    assert "## Head, middle and tail queries" in report_markdown(aggregate(with_buckets))


# ----------------------------------------------------------------------------- plots


def drawn(figure: Figure) -> RendererBase:
    figure.canvas.draw()
    return figure.canvas.get_renderer()


def assert_legend_beside_the_data(figure: Figure, names: list[str]) -> None:
    """One figure legend naming every config, clear of every panel (inside one it covers points)."""
    renderer = drawn(figure)
    assert all(axis.get_legend() is None for axis in figure.axes)
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == names
    box = legend.get_window_extent(renderer)
    for axis in figure.axes:
        assert not box.overlaps(axis.get_window_extent(renderer))


def test_one_training_size_draws_each_config_as_a_category() -> None:
    """No dodge on a size axis (ticks like "990 ... 1010" or an offset of 1e3): configs by name."""
    one_size = [{**r, "train_images": "16", "train_size": 16} for r in ROWS]
    figure = results_figure(aggregate(one_size), "flickr8k_baseline")
    drawn(figure)
    assert figure.get_suptitle().splitlines() == [
        "flickr8k_baseline",
        "mean over seeds, 95% t-interval",
    ]
    for axis in figure.axes:
        assert [t.get_text() for t in axis.get_xticklabels()] == ["a", "b"]
        assert list(axis.get_xticks()) == [0, 1]
        assert axis.xaxis.get_offset_text().get_text() == ""
        assert axis.get_xlabel() == "config (16 training images)"
        assert [list(line.get_xdata()) for line in axis.lines[::3]] == [[0], [1]]
    rsum = figure.axes[0]
    assert [float(line.get_ydata()[0]) for line in rsum.lines[::3]] == [167.0, 200.0]
    assert not figure.legends  # the tick labels name the configs


def test_several_training_sizes_draw_lines_with_the_legend_below() -> None:
    figure = results_figure(aggregate(ROWS), "my comparison")  # a at 16 images, b at 48
    assert_legend_beside_the_data(figure, ["a", "b"])
    assert figure.get_suptitle().startswith("my comparison\n")
    for axis in figure.axes:
        assert axis.get_xscale() == "log" and axis.get_xlabel() == "training images"
        assert [t.get_text() for t in axis.get_xticklabels()] == ["16", "48"]


@pytest.mark.slow
def test_results_plot_is_titled_after_the_comparison_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    titles = []

    def record(groups, title: str) -> Figure:
        titles.append(title)
        return results_figure(groups, title)

    monkeypatch.setattr(compare_results, "results_figure", record)
    write_results(tmp_path / "flickr8k_mmts", ROWS)
    write_results(tmp_path / "other", ROWS, title="Flickr8k: MM-TS")
    assert titles == ["flickr8k_mmts", "Flickr8k: MM-TS"]


def test_stress_plot_titled_with_one_legend_and_one_colour_per_config() -> None:
    rows = [
        {"name": name, "train_images": size, "seed": seed, "rate": rate, "rsum": 100.0 - rate}
        for name in ("fixed", "arl")
        for size in ("100", "200")
        for seed in (0, 1)
        for rate in (0.0, 0.5)
    ]
    figure = stress_figure(aggregate_stress(rows), "both", "Generated: ARL")
    assert_legend_beside_the_data(figure, ["fixed", "arl"])
    assert figure.get_suptitle() == "Generated: ARL\nretrieval under caption and image noise"
    assert [axis.get_title() for axis in figure.axes] == ["100 train images", "200 train images"]
    colours = [[line.get_color() for line in axis.lines[::3]] for axis in figure.axes]
    assert colours[0] == colours[1] and len(set(colours[0])) == 2


def test_a_stress_plot_of_21_configs_at_one_size_tells_every_line_apart_and_fits() -> None:
    """Past matplotlib's 10 and 20 colours each config still has its own look, and the title and
    the legend of one narrow panel stay inside the figure."""
    names = [f"config_{i}" for i in range(21)]
    rows = [
        {"name": name, "train_images": "1000", "seed": seed, "rate": rate, "rsum": 400.0 - rate}
        for name in names
        for seed in (0, 1)
        for rate in (0.0, 0.2)
    ]
    title = "Reality check, generated long-tail data with the image tower trained from scratch"
    figure = stress_figure(aggregate_stress(rows), "both", title)
    assert_legend_beside_the_data(figure, names)
    looks = [
        (to_rgba(bars.lines[0].get_color()), bars.lines[0].get_marker())
        for bars in figure.axes[0].containers
    ]
    assert len(looks) == 21 and len(set(looks)) == 21
    renderer = drawn(figure)
    inside = figure.bbox
    (suptitle,) = (t for t in figure.findobj(Text) if t.get_text() == figure.get_suptitle())
    for text in (suptitle, *figure.legends):
        box = text.get_window_extent(renderer)
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1, (box, inside)


# ----------------------------------------------------------------------------- run summary


def fake_trainer(epoch: int, metrics: dict[str, float], sanity: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        sanity_checking=sanity,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        current_epoch=epoch,
        global_step=3 * (epoch + 1),
        callback_metrics={k: torch.tensor(v) for k, v in metrics.items()},
        is_global_zero=True,
        train_dataloader=SimpleNamespace(dataset=range(48)),
    )


def fake_clock(monkeypatch: pytest.MonkeyPatch, start: float) -> list[float]:
    """The run summary's clock, set by hand: ``now[0] = t`` moves it."""
    now = [start]
    monkeypatch.setattr(run_summary, "clock", lambda: now[0])
    return now


def test_run_summary_keeps_best_last_and_history_across_a_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    now = fake_clock(monkeypatch, 100.0)
    target = tmp_path / "run" / "summary.json"
    first = RunSummary(str(target))
    first.on_fit_start(None, None)
    first.on_validation_end(fake_trainer(0, {"val/rsum": 999.0}, sanity=True), None)
    for epoch, rsum in ((0, 100.0), (1, 150.0)):
        metrics = {"val/rsum": rsum, "val/i2t_R@1": rsum / 10, "train/loss": 1.0}
        first.on_validation_end(fake_trainer(epoch, metrics), None)
    now[0] = 112.5
    state = first.state_dict()  # its checkpoint, 12.5 s in; then it is killed

    resumed = RunSummary(str(target))  # as a run restarted from its checkpoint
    resumed.load_state_dict(state)
    now[0] = 500.0
    resumed.on_fit_start(None, None)
    resumed.on_validation_end(fake_trainer(2, {"val/rsum": 120.0, "val/i2t_R@1": 12.0}), None)
    now[0] = 504.25
    resumed.on_fit_end(fake_trainer(3, {}), None)

    summary = json.loads(target.read_text())
    assert [entry["epoch"] for entry in summary["history"]] == [0, 1, 2]  # sanity check skipped
    assert summary["best"] == {"epoch": 1, "step": 6, "rsum": 150.0, "i2t_R@1": 15.0}
    assert summary["last"]["epoch"] == 2 and summary["last"]["rsum"] == 120.0
    assert summary["seed"] == 7 and summary["train_size"] == 48
    assert summary["epochs"] == 3 and summary["global_step"] == 12
    assert summary["wall_seconds"] == 12.5 + 4.25  # up to the checkpoint, plus the second attempt
    # no temporary left; the clock file names this chain of attempts
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.clock.json", "summary.json"]

    csv_row = summary_row("x", "16", 7, summary)
    assert (csv_row["best_epoch"], csv_row["rsum"], csv_row["last_rsum"]) == (1, 150.0, 120.0)
    assert csv_row["collapsed"] is None  # the run did not watch for a collapse
    assert summary_row("x", "16", 7, {**summary, "collapsed": True})["collapsed"] is True


def test_a_resumed_attempt_counts_the_time_its_predecessor_spent_after_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished attempt whose summary is gone resumes from its last checkpoint: its time after
    that checkpoint (the rest of fit) is still counted, and a clock of another run never is."""
    now = fake_clock(monkeypatch, 0.0)
    target = tmp_path / "summary.json"
    first = RunSummary(str(target))
    first.on_fit_start(None, None)
    now[0] = 30.0
    state = first.state_dict()  # the last checkpoint, at 30 s
    now[0] = 35.5
    first.on_fit_end(fake_trainer(1, {}), None)
    assert json.loads(target.read_text())["wall_seconds"] == 35.5
    target.unlink()

    second = RunSummary(str(target))
    second.load_state_dict(state)
    now[0] = 200.0
    second.on_fit_start(None, None)
    now[0] = 202.0
    second.on_fit_end(fake_trainer(1, {}), None)
    assert json.loads(target.read_text())["wall_seconds"] == 35.5 + 2.0  # not 30 + 2

    other = RunSummary(str(target))  # a checkpoint of another run, resumed into the same path
    other.load_state_dict({**state, "run_id": "another run"})
    assert other.wall_seconds() == 30.0


def test_an_attempt_stopped_by_an_error_records_its_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = fake_clock(monkeypatch, 10.0)
    target = tmp_path / "summary.json"
    first = RunSummary(str(target))
    first.on_fit_start(None, None)
    now[0] = 14.0
    state = first.state_dict()
    now[0] = 19.0
    first.on_exception(fake_trainer(0, {}), None, KeyboardInterrupt())
    assert not target.exists()  # not finished
    second = RunSummary(str(target))
    second.load_state_dict(state)
    assert second.wall_seconds() == 9.0


# ----------------------------------------------------------------------------- settings


def test_override_arguments_pass_through_to_every_run() -> None:
    parser = build_parser()
    argv = ["--seeds", "0", "--override", "--trainer.max_epochs=3", "--model.lr", "0.1"]
    argv += ["--dry-run", "--", "--config", "extra.yaml"]
    own, overrides = split_overrides(argv, own_options(parser))
    assert own == ["--seeds", "0", "--dry-run"]
    assert overrides == ["--trainer.max_epochs=3", "--model.lr", "0.1", "--config", "extra.yaml"]


def test_comparison_file_with_command_line_precedence(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "comparison.yaml"
    spec.write_text(
        "configs:\n"
        f"  - {{name: first, config: {TINY}}}\n"
        f"  - {TINY}\n"
        "seeds: [0, 1, 2]\n"
        "train_images: [16, all]\n"
        f"output: {tmp_path / 'out'}\n"
        "overrides: [--trainer.max_epochs=2]\n"
    )
    parser = build_parser()
    argv = ["--config", str(spec), "--names", "first", "second", "--seeds", "5"]
    argv += ["--override", "--model.lr=0.1"]
    own, overrides = split_overrides(argv, own_options(parser))
    settings = resolve_settings(parser.parse_args(own), overrides)
    assert settings.names == ["first", "second"] and settings.seeds == [5]
    assert settings.train_images == [16, None]
    assert settings.overrides == ["--trainer.max_epochs=2", "--model.lr=0.1"]

    main([*argv, "--dry-run"])
    printed = capsys.readouterr().out
    assert "4 runs (0 finished)" in printed
    assert "[1/4] first n=16 seed=5 (to run)" in printed
    assert "[4/4] second n=all seed=5 (to run)" in printed
    assert "--data.train_images 16 " in printed and "runs/second/nall/seed5 " in printed
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_a_comparison_file_extends_another_and_adds_its_overrides(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(
        f"configs: [{TINY}]\nseeds: [0, 1]\ntrain_images: [16, 32]\n"
        f"output: {tmp_path / 'base'}\noverrides: [--trainer.max_epochs=2]\n"
    )
    variant = tmp_path / "variant.yaml"
    variant.write_text(
        f"extends: {base}\ntrain_images: [16]\noutput: {tmp_path / 'variant'}\n"
        "overrides: [--data.noise.caption_rate=0.2]\n"
    )
    parser = build_parser()
    own, overrides = split_overrides(["--config", str(variant)], own_options(parser))
    settings = resolve_settings(parser.parse_args(own), overrides)
    assert settings.configs == [TINY] and settings.seeds == [0, 1]  # from the base
    assert settings.train_images == [16] and settings.output == tmp_path / "variant"  # replaced
    assert settings.overrides == ["--trainer.max_epochs=2", "--data.noise.caption_rate=0.2"]

    variant.write_text(f"extends: {base}\noverrides: null\n")  # adds nothing, keeps the base's
    own, overrides = split_overrides(["--config", str(variant)], own_options(parser))
    assert resolve_settings(parser.parse_args(own), overrides).overrides == [
        "--trainer.max_epochs=2"
    ]


@pytest.mark.parametrize(
    ("extends", "expected"),
    [
        ("loop", "which leads back to"),
        ("missing", "gone.yaml: no such file"),
        ("list", "one file's path"),
    ],
)
def test_a_bad_extends_is_one_error_naming_the_file(
    tmp_path: Path, capsys, extends: str, expected: str
) -> None:
    spec, other = tmp_path / "spec.yaml", tmp_path / "other.yaml"
    other.write_text(f"extends: {spec}\n")
    target = {"loop": str(other), "missing": str(tmp_path / "gone.yaml"), "list": f"[{other}]"}
    spec.write_text(f"extends: {target[extends]}\nconfigs: [{TINY}]\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(spec), "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and str(spec.name) in err


def test_the_example_comparison_plans_fixed_vs_learnable_temperature(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    repository = Path(__file__).parent.parent
    monkeypatch.chdir(repository)  # the example's paths are relative to the repository root
    fixed, learnable = (
        yaml.safe_load((repository / f"configs/generated/{kind}_temperature.yaml").read_text())
        for kind in ("fixed", "learnable")
    )
    assert fixed["model"].pop("learn_temperature") is False
    assert learnable["model"].pop("learn_temperature") is True
    assert fixed == learnable and "logger" not in fixed["trainer"]

    main(["--config", "configs/compare/generated_temperature.yaml", "--dry-run"])
    printed = capsys.readouterr().out
    assert printed.startswith("18 runs")
    assert "[1/18] fixed n=500 seed=0" in printed and "[18/18] learnable n=2000 seed=2" in printed


def test_layered_configs_become_repeated_config_arguments(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The Flickr8k baseline layers a method overlay on a base config, as repeated --config."""
    monkeypatch.chdir(Path(__file__).parent.parent)
    main(["--config", "configs/compare/flickr8k_baseline.yaml", "--dry-run"])
    printed = capsys.readouterr().out
    assert printed.startswith("18 runs")
    layered = (
        "fit --config configs/flickr8k/base.yaml --config configs/flickr8k/fixed_temperature.yaml"
    )
    assert layered in printed
    assert "[18/18] learnable n=6000 seed=2" in printed


REPOSITORY = Path(__file__).parent.parent
COMPARISON_FILES = sorted((REPOSITORY / "configs" / "compare").rglob("*.yaml"))


@pytest.mark.parametrize(
    "spec", COMPARISON_FILES, ids=[str(p.relative_to(REPOSITORY)) for p in COMPARISON_FILES]
)
def test_every_shipped_comparison_plans_runs_from_existing_configs(
    spec: Path, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    """A comparison file the README points to plans its runs, and every config it layers exists."""
    monkeypatch.chdir(REPOSITORY)
    main(["--config", str(spec.relative_to(REPOSITORY)), "--dry-run", "--output", str(tmp_path)])
    printed = capsys.readouterr().out
    planned = int(printed.split(" runs", 1)[0])
    commands = [line.split() for line in printed.splitlines() if " fit " in line]
    assert planned > 0 and len(commands) == planned
    named = {words[i + 1] for words in commands for i, w in enumerate(words) if w == "--config"}
    assert named and all((REPOSITORY / path).is_file() for path in named), named


def test_repeated_names_are_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--configs", TINY, TINY, "--output", "unused"])
    assert exit_info.value.code == 2
    assert "repeat" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real runs


def compare(output: Path, tiny_text_model: str, *extra: str) -> tuple[int, str, str]:
    """``adaptalign compare`` through the real entry point; returns exit code, stdout, stderr."""
    return compare_here(output, tiny_text_model, extra)


@pytest.fixture(scope="module")
def comparison(tiny_text_model: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One real comparison: the tiny config, 2 seeds x 16 and 32 training images."""
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAPTALIGN_CACHE", str(root / "cache"))
        patch.setenv("OMP_NUM_THREADS", "1")  # one core per run: two runs share the two cores
        code, out, err = compare(root / "out", tiny_text_model, *COMMAND)
    assert code == 0, out + err
    return root / "out", out


COMMAND = ("--configs", TINY, "--train-images", "16", "32", "--jobs", "2")


def run_files(output: Path) -> dict[str, int]:
    return {
        str(p.relative_to(output)): p.stat().st_mtime_ns
        for p in (output / "runs").rglob("*")
        if p.is_file()
    }


@pytest.mark.slow
def test_comparison_writes_summaries_and_results(comparison: tuple[Path, str]) -> None:
    output, printed = comparison
    for label in ("tiny n=16 seed=0", "tiny n=32 seed=0", "tiny n=16 seed=1", "tiny n=32 seed=1"):
        assert f"{label} started" in printed and f"{label} done in" in printed
    assert "[1/4] tiny n=16 seed=0 started" in printed and "rsum" in printed

    with (output / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["train_images"], r["seed"]) for r in rows] == [
        ("16", "0"),
        ("16", "1"),
        ("32", "0"),
        ("32", "1"),
    ]
    for r in rows:
        folder = output / "runs" / "tiny" / f"n{r['train_images']}" / f"seed{r['seed']}"
        summary = json.loads((folder / "summary.json").read_text())
        assert {"best", "last", "history"} <= summary.keys() and summary["history"]
        assert summary["seed"] == int(r["seed"])
        assert summary["train_size"] == int(r["train_images"]) == int(r["train_size"])
        best = max(summary["history"], key=lambda entry: entry["rsum"])
        # selected on val, reported once on the test split (the comparison's default)
        assert float(r["selection_rsum"]) == pytest.approx(best["rsum"])
        assert summary["report"]["split"] == "test" and r["reported_on"].startswith("test (")
        assert float(r["rsum"]) == pytest.approx(summary["report"]["rsum"])
        assert float(r["last_rsum"]) == pytest.approx(summary["last"]["rsum"])
        assert int(r["best_epoch"]) == best["epoch"] == summary["report"]["epoch"]
        assert list(folder.glob("version_0/events.out.tfevents.*"))  # TensorBoard per run

    markdown = (output / "results.md").read_text()
    assert "| tiny | 16 | 2 |" in markdown and "| tiny | 32 | 2 |" in markdown
    assert (output / "results.png").read_bytes().startswith(b"\x89PNG")
    assert (output / "comparison.yaml").stat().st_size > 0


@pytest.fixture()
def same_environment(comparison: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    output, _ = comparison
    monkeypatch.setenv("ADAPTALIGN_CACHE", str(output.parent / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return output


@pytest.mark.slow
def test_rerunning_the_same_command_skips_every_finished_run(
    same_environment: Path, tiny_text_model: str
) -> None:
    output = same_environment
    before = run_files(output)
    code, printed, _ = compare(output, tiny_text_model, *COMMAND)
    assert code == 0
    assert printed.count("skipped (finished)") == 4 and "started" not in printed
    assert run_files(output) == before  # no new file, none rewritten
    with (output / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 4


@pytest.mark.slow
def test_a_deleted_summary_reruns_that_run_and_failures_do_not_stop_the_rest(
    same_environment: Path, tiny_text_model: str
) -> None:
    """Delete one run's summary and checkpoints, as if it died before its first validation, and
    add a size larger than the 48-image split, which fails per seed.

    Three runs at a time keep the test short; each failure is an ordinary result of the pool, so
    the order in which runs end does not matter.
    """
    output = same_environment
    before = run_files(output)
    (output / "runs" / "tiny" / "n32" / "seed1" / "summary.json").unlink()
    shutil.rmtree(output / "runs" / "tiny" / "n32" / "seed1" / "version_0" / "checkpoints")
    code, printed, errors = compare(output, tiny_text_model, *COMMAND[:-2], "64", "--jobs", "3")
    assert code == 1
    assert printed.count("skipped (finished)") == 3 and printed.count("started") == 3
    assert "tiny n=32 seed=1 done in" in printed
    assert "tiny n=64 seed=0 FAILED (exit 2)" in printed
    assert "tiny n=64 seed=1 FAILED (exit 2)" in printed
    assert "2 of 6 runs failed" in errors
    assert "train_images=64 but the train split has only 48 images" in errors  # log's last lines

    after = run_files(output)
    for name, mtime in before.items():
        if not name.startswith("runs/tiny/n32/seed1/"):
            assert after[name] == mtime, name  # only the deleted run ran again
    assert "runs/tiny/n32/seed1/summary.json" in after
    assert not (output / "runs" / "tiny" / "n64" / "seed0" / "summary.json").exists()
    with (output / "results.csv").open() as handle:  # the report covers the finished runs
        assert len(list(csv.DictReader(handle))) == 4


@pytest.mark.slow
def test_an_interrupted_run_goes_on_from_its_last_checkpoint(
    same_environment: Path, tiny_text_model: str
) -> None:
    """No summary but a ``last.ckpt`` from the same arguments: the run continues in place."""
    output = same_environment
    folder = output / "runs" / "tiny" / "n16" / "seed0"
    before = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").unlink()
    best = {p: p.stat().st_mtime_ns for p in folder.glob("version_0/checkpoints/best-*.ckpt")}
    assert best

    code, printed, errors = compare(output, tiny_text_model, *COMMAND)
    assert code == 0, printed + errors
    last = folder / "version_0" / "checkpoints" / "last.ckpt"
    epoch, step = before["last"]["epoch"], before["global_step"]
    assert f"tiny n=16 seed=0 resumed from {last} (epoch {epoch}, step {step})" in printed
    assert printed.count("skipped (finished)") == 3 and "started" not in printed
    # a fresh start would have emptied the folder and written its checkpoints again
    assert {p: p.stat().st_mtime_ns for p in best} == best
    assert sorted(p.name for p in folder.glob("version_*")) == ["version_0"]
    after = json.loads((folder / "summary.json").read_text())
    assert after["history"] == before["history"] and after["global_step"] == step
    # The attempts' times add up: the second adds its own (>= 0) to the first's whole time, which
    # its clock file kept although the summary was deleted.
    assert after["wall_seconds"] >= before["wall_seconds"]
    attempts = (folder / "log.txt").read_text().split("\n$ ")
    assert len(attempts) == 2 and f"--ckpt_path {last}" in attempts[1]


def test_an_attempt_in_another_setting_is_not_continued(tmp_path: Path) -> None:
    """Other overrides, or a config file edited since, start afresh; so does a finished run."""
    from adaptalign.experiments.compare_runs import (
        Run,
        checkpoint_position,
        file_digests,
        fit_command,
        resume_point,
        same_setting,
    )

    config = tmp_path / "tiny.yaml"
    config.write_text(Path(TINY).read_text())
    run = Run("tiny", str(config), 16, 0, tmp_path / "run")
    last = run.folder / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"not a checkpoint")
    arguments = fit_command(run, ["--trainer.max_epochs=3"])[1:]
    assert list(file_digests(arguments)) == [str(config)]
    record = {"arguments": arguments, "files": file_digests(arguments)}
    (run.folder / "run.json").write_text(json.dumps(record))
    assert resume_point(run, ["--trainer.max_epochs=3"]) == last
    assert checkpoint_position(last) == ""  # unreadable: left to fit to report
    assert resume_point(run, ["--trainer.max_epochs=4"]) is None
    config.write_text(config.read_text() + "\n# edited\n")
    assert resume_point(run, ["--trainer.max_epochs=3"]) is None
    record["files"] = file_digests(arguments)
    (run.folder / "run.json").write_text(json.dumps(record))
    assert resume_point(run, ["--trainer.max_epochs=3"]) == last
    (run.folder / "summary.json").write_text("{}")
    assert resume_point(run, ["--trainer.max_epochs=3"]) is None  # finished: nothing to go on with
    # the summary an argument names is the run's own output, not a setting that changed
    assert same_setting(run, ["--trainer.max_epochs=3"])


def test_an_override_reaches_a_method_and_the_summary_comes_last(tmp_path: Path, capsys) -> None:
    """An override of a method's setting reaches it; the run summary is added after overrides,
    so an override that appends a callback of its own (and sets it) is not taken by the summary."""
    from adaptalign.experiments.compare_runs import Run, fit_command

    run = Run("arl", f"{TINY}+configs/methods/arl.yaml", 16, 0, tmp_path / "run")
    writer = "adaptalign.callbacks.embedding_writer.EmbeddingWriter"
    overrides = ["--methods.arl.gamma=0.5", f"--trainer.callbacks+={writer}"]
    command = fit_command(run, [*overrides, "--trainer.callbacks.output_path=mine.pt"])
    assert command[3] == "fit"
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*command[3:], "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["methods"]["arl"]["init_args"]["gamma"] == 0.5
    assert printed["methods"]["arl"]["init_args"]["warmup_epochs"] == 5  # the rest of arl.yaml
    settings = {
        c["class_path"].rsplit(".", 1)[1]: c.get("init_args", {})
        for c in printed["trainer"]["callbacks"]
    }
    assert settings["EmbeddingWriter"]["output_path"] == "mine.pt"
    assert settings["RunSummary"]["output_path"] == str(run.summary_path)


@pytest.mark.slow
def test_stress_test_of_finished_runs(comparison: tuple[Path, str], tiny_text_model: str) -> None:
    """``--stress-rates`` evaluates each finished run's best checkpoint under noise, once."""
    output, _ = comparison
    extra = ("--configs", TINY, "--train-images", "16", "--stress-rates", "0", "0.5")
    code, out, err = compare(output, tiny_text_model, *extra, "--stress-modality", "text")
    assert code == 0, out + err
    assert "[stress 1/2] tiny n=16 seed=0 (text noise)" in out
    assert (output / "results_stress.csv").is_file(), out + err
    with (output / "results_stress.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["seed"], float(r["rate"])) for r in rows] == [
        ("0", 0.0),
        ("0", 0.5),
        ("1", 0.0),
        ("1", 0.5),
    ]
    with (output / "results.csv").open() as handle:
        best = {
            r["seed"]: float(r["rsum"]) for r in csv.DictReader(handle) if r["train_images"] == "16"
        }
    for r in rows:
        if float(r["rate"]) == 0.0:  # the clean split: the best validation again
            assert float(r["rsum"]) == pytest.approx(best[r["seed"]], abs=1e-4)
    markdown = (output / "results_stress.md").read_text()
    assert "| tiny | 16 | 0.5 | 2 |" in markdown
    assert (output / "results_stress.png").stat().st_size > 1000
    # A second call finds every stress result and runs nothing again.
    code, out, err = compare(output, tiny_text_model, *extra, "--stress-modality", "text")
    assert code == 0 and "[stress" not in out


@pytest.mark.slow
def test_runs_on_ray_say_where_and_fresh_processes_give_what_warm_workers_give(
    comparison: tuple[Path, str],
    tiny_text_model: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fixture ran on warm workers, 2 at a time with a CPU each; a fresh process per run, in
    the same share, reaches the very same validations."""
    output, printed = comparison
    assert "Ray places the runs: 2 at a time, each with 1 CPU" in printed
    assert "[1/4] tiny n=16 seed=0 started on " in printed
    assert "3 ended, 1 running, 0 waiting" in printed or "3 ended, 0 running, 1 waiting" in printed
    monkeypatch.setenv("ADAPTALIGN_CACHE", str(output.parent / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fresh = tmp_path / "fresh"
    code, out, err = compare(
        fresh,
        tiny_text_model,
        "--configs",
        TINY,
        "--train-images",
        "16",
        "--jobs",
        "2",
        "--workers",
        "fresh",
    )
    assert code == 0, out + err
    for seed in (0, 1):
        warm_summary = json.loads(
            (output / "runs/tiny/n16" / f"seed{seed}/summary.json").read_text()
        )
        fresh_summary = json.loads(
            (fresh / "runs/tiny/n16" / f"seed{seed}/summary.json").read_text()
        )
        assert fresh_summary["history"] == warm_summary["history"]
    for folder in (output, fresh):  # each log holds the command and the fit's own output
        log = (folder / "runs/tiny/n16/seed0/log.txt").read_text()
        assert log.startswith("$ ") and "rsum" in log


@pytest.mark.slow
def test_a_run_whose_worker_dies_is_tried_once_more_from_its_last_checkpoint(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm worker killed mid-run (a pre-empted machine): the run goes on from the ``last.ckpt``
    of its first epoch on a new worker and ends as a run never interrupted does."""
    monkeypatch.chdir(Path(__file__).parents[1])  # tests.helpers.killer imports from here
    monkeypatch.setenv("ADAPTALIGN_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "died"
    kill = [
        "--trainer.max_epochs=2",
        "--trainer.callbacks+=tests.helpers.killer.KillOnceAt",
        "--trainer.callbacks.step=4",  # 3 batches an epoch: dies in the second epoch
        f"--trainer.callbacks.marker={marker}",
    ]
    args = ("--configs", TINY, "--train-images", "48", "--seeds", "0")
    code, printed, errors = compare(tmp_path / "out", tiny_text_model, *args, "--override", *kill)
    assert code == 0, printed + errors
    assert marker.exists()
    assert "tiny n=48 seed=0 FAILED (its worker died: " in printed
    assert "; trying once more" in printed
    last = tmp_path / "out/runs/tiny/n48/seed0/version_0/checkpoints/last.ckpt"
    assert f"tiny n=48 seed=0 resumed from {last} (epoch 0, step 3) on " in printed
    assert "tiny n=48 seed=0 done in " in printed
    summary = json.loads((tmp_path / "out/runs/tiny/n48/seed0/summary.json").read_text())
    assert [entry["epoch"] for entry in summary["history"]] == [0, 1]


@pytest.mark.slow
def test_a_run_that_fails_again_is_reported_and_the_command_fails(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).parents[1])
    monkeypatch.setenv("ADAPTALIGN_CACHE", str(tmp_path / "cache"))
    kill = [
        "--trainer.max_epochs=2",
        "--trainer.callbacks+=tests.helpers.killer.KillAt",
        "--trainer.callbacks.step=4",
    ]
    args = ("--configs", TINY, "--train-images", "48", "--seeds", "0", "--workers", "fresh")
    code, printed, errors = compare(tmp_path / "out", tiny_text_model, *args, "--override", *kill)
    assert code == 1
    assert printed.count("tiny n=48 seed=0 FAILED (exit -9)") == 2
    assert printed.count("trying once more") == 1
    assert "1 of 1 runs failed" in errors


@pytest.mark.slow
def test_method_runs_one_after_another_on_a_warm_worker_equal_fresh_processes(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing of one run stays behind in a warm worker for the next: two runs of the combined
    methods (MM-TS, loss weights, TOnICS, ARL) on one worker reach the validations that a fresh
    process per run reaches."""
    monkeypatch.setenv("ADAPTALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = "+".join([TINY, *COMBINED_METHODS])
    clusters = [f"--data.clusters.text_model={tiny_text_model}", "--data.clusters.num_clusters=4"]
    histories = {}
    for mode in ("warm", "fresh"):
        output = tmp_path / mode
        args = ("--configs", config, "--names", "combined", "--train-images", "32")
        code, out, err = compare(
            output,
            tiny_text_model,
            *args,
            "--workers",
            mode,
            "--override",
            *clusters,
            "--trainer.max_epochs=2",
        )
        assert code == 0, out + err
        assert "Ray places the runs: 1 at a time" in out
        histories[mode] = [
            json.loads((output / f"runs/combined/n32/seed{seed}/summary.json").read_text())[
                "history"
            ]
            for seed in (0, 1)
        ]
    assert histories["warm"] == histories["fresh"]
    assert histories["warm"][0] != histories["warm"][1]  # two seeds, two different runs
