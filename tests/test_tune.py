"""``adaptalign tune``: the tuning file checked whole, the scores by hand, and a real study on
tiny generated data that is interrupted, continued, and whose best setting ``fit`` accepts."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from adaptalign.cli import main as cli_main
from adaptalign.common.errors import ConfigurationError
from adaptalign.experiments.tune_results import Trial, best_trial, overlay_yaml
from adaptalign.experiments.tune_settings import overlay, read_study
from adaptalign.experiments.tune_trial import Scoreboard

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
SPACE = {
    "model.lr": {"loguniform": [0.0003, 0.03]},
    "model.temperature": {"uniform": [0.03, 0.2]},
}


def study_file(folder: Path, **changes: object) -> Path:
    document = {"base": TINY, "space": SPACE, "trials": 4, "output": str(folder / "out")}
    document.update(changes)
    document = {k: v for k, v in document.items() if v is not None}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trials": None}, "no trial budget; expected trials: N"),
        ({"trials": 0}, "trials: 0; expected an integer >= 1"),
        ({"space": {"model.lr": {"uniform": [0.1, 0.1]}}}, "space: model.lr: empty range"),
        ({"space": {"model.lr": {"loguniform": [0, 1]}}}, "loguniform needs low > 0"),
        ({"space": {"model.lr": {"normal": [0, 1]}}}, "unknown distribution 'normal'"),
        ({"space": {"x.y": {"int": [1.5, 3]}}}, "space: x.y: int needs integer ends"),
        ({"space": {"x.y": {"choice": ["a"]}}}, "a choice needs at least 2 options"),
        ({"space": {"x.y": {"choice": []}}}, "choice needs a non-empty list"),
        ({"space": {}}, "no search space"),
        ({"base": None}, "no base config"),
        ({"budget": 3}, "unknown key(s) ['budget']"),
        ({"seeds": [1, 1]}, "seeds: [1, 1]; expected distinct integers"),
        ({"early_stopping": {"grace_period": 0}}, "grace_period: expected >= 1"),
    ],
)
def test_a_bad_tuning_file_is_one_error_naming_file_and_setting(
    tmp_path: Path, changes: dict, message: str
) -> None:
    path = study_file(tmp_path, **changes)
    with pytest.raises(ConfigurationError) as raised:
        read_study(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)


def test_the_command_line_sets_the_training_images_of_every_trial(tmp_path: Path) -> None:
    path = study_file(tmp_path, train_images=1000)
    assert read_study(path).train_images == 1000
    assert read_study(path, train_images="5000").train_images == 5000
    assert read_study(path, train_images="all").train_images is None
    with pytest.raises(ConfigurationError, match=r"yaml: --train-images: train images 'lots'"):
        read_study(path, train_images="lots")
    with pytest.raises(ConfigurationError, match=r"study.yaml: train_images: train images 'lots'"):
        read_study(study_file(tmp_path, train_images="lots"))


def test_the_best_setting_says_the_training_images_it_was_tuned_at(tmp_path: Path) -> None:
    path = study_file(tmp_path, train_images=1000)
    best = Trial("a", {"model.lr": 0.1}, 150.0, 15, "complete")
    for given, said in ((None, "train images: 1000"), ("5000", "train images: 5000")):
        text = overlay_yaml(read_study(path, train_images=given), best)
        assert text.splitlines()[0].endswith(f"(1 seed(s): 0; {said}):"), text
        assert yaml.safe_load(text) == {"model": {"lr": 0.1}}


def test_the_command_line_ends_a_bad_study_with_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = study_file(tmp_path, trials=None)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["tune", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"adaptalign: error: {path}: no trial budget; expected trials: N (an integer >= 1)"
    ]


@pytest.mark.slow
def test_an_unknown_hyperparameter_is_refused_before_any_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = {**SPACE, "methods.arl.gama": {"uniform": [1.0, 4.0]}}
    path = study_file(tmp_path, space=space, base=[TINY, str(ROOT / "configs/methods/arl.yaml")])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["tune", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option --methods.arl.gama; did you mean --methods.arl.gamma?" in err
    assert not (tmp_path / "out").exists()  # nothing started


def test_a_trial_setting_is_the_config_layer_and_the_fit_arguments_it_says(tmp_path: Path) -> None:
    config = {"model.lr": 0.003, "methods.arl.gamma": 2.5, "methods.tonics.schedule": "ramp"}
    assert overlay(config) == {
        "model": {"lr": 0.003},
        "methods": {"arl": {"gamma": 2.5}, "tonics": {"schedule": "ramp"}},
    }
    study = read_study(study_file(tmp_path))
    assert study.fit_arguments({**config, "methods.arl.warmup_epochs": np.int64(3)}) == [
        "--model.lr=0.003",
        "--methods.arl.gamma=2.5",
        "--methods.tonics.schedule=ramp",
        "--methods.arl.warmup_epochs=3",
    ]


def test_the_score_is_the_mean_over_seeds_of_each_best_validation_so_far() -> None:
    sent: list[dict] = []
    board = Scoreboard("val/rsum", "max", sent.append)
    for epoch, value in enumerate([100.0, 120.0, 110.0]):  # seed 0: best 100, 120, 120
        board.validation(0, epoch, value)
    board.seed_done()
    for epoch, value in enumerate([90.0, 80.0, 140.0]):  # seed 1: best 90, 90, 140
        board.validation(1, epoch, value)
    assert [m["score"] for m in sent] == [100.0, 120.0, 120.0, 105.0, 105.0, 130.0]
    low = Scoreboard("val/loss", "min", sent.append)
    low.validation(0, 0, 2.0)
    low.validation(0, 1, 3.0)
    assert sent[-1]["score"] == 2.0


def test_only_trials_that_ran_out_compete_for_best() -> None:
    trials = [
        Trial("a", {"model.lr": 0.1}, 150.0, 15, "complete"),
        Trial("b", {"model.lr": 0.2}, 190.0, 4, "stopped early"),  # a partial score
        Trial("c", {"model.lr": 0.3}, 160.0, 15, "complete"),
        Trial("d", {"model.lr": 0.4}, None, 0, "failed"),
    ]
    assert best_trial(trials, "max").name == "c"
    assert best_trial(trials, "min").name == "a"
    assert best_trial(trials[1:2], "max") is None


# ----------------------------------------------------------------------------- a real study


def summaries(output: Path) -> dict[str, int]:
    return {
        str(p.relative_to(output)): p.stat().st_mtime_ns
        for p in output.glob("trials/*/*/summary.json")
    }


@pytest.fixture(scope="module")
def study(tiny_text_model: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    """4 trials of 2 epochs on the tiny config: started in a process that is killed once two
    trials have finished, then continued by the same command here."""
    root = tmp_path_factory.mktemp("tune")
    path = study_file(
        root,
        early_stopping={"grace_period": 1, "reduction_factor": 2},
        overrides=[f"--model.text_tower.model_name={tiny_text_model}", "--trainer.max_epochs=2"],
    )
    env = {**os.environ, "ADAPTALIGN_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "adaptalign", "tune", str(path)]
    with (root / "first.log").open("w") as log:
        first = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
        )  # its Ray goes with it
        deadline = time.monotonic() + 600  # a safety net, not a measurement
        while len(summaries(root / "out")) < 2 and first.poll() is None:
            assert time.monotonic() < deadline, (root / "first.log").read_text()
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = summaries(root / "out")
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAPTALIGN_CACHE", str(root / "cache"))
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.chdir(root)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(["tune", str(path)])
    assert code == 0, out.getvalue() + err.getvalue()
    return root / "out", out.getvalue(), before


@pytest.mark.slow
def test_a_study_continues_where_it_was_killed_and_spends_its_budget_once(study) -> None:
    output, printed, before = study
    assert len(before) >= 2
    assert f"continuing the study in {output.resolve() / 'study'}" in printed
    after = summaries(output)
    for name, mtime in before.items():  # the trials finished before the kill did not run again
        assert after[name] == mtime, name
    with (output / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4
    assert {r["status"] for r in rows} <= {"complete", "stopped early"}
    for row in rows:
        runs = list((output / "trials" / row["trial"]).glob("seed0/summary.json"))
        assert (row["status"] == "complete") == bool(runs)


@pytest.mark.slow
def test_the_best_setting_is_no_worse_than_the_first_trial_and_fit_takes_it(
    study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_text_model: str
) -> None:
    output, printed, _ = study
    with (output / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    complete = [r for r in rows if r["status"] == "complete"]
    best = yaml.safe_load((output / "best.yaml").read_text())
    chosen = max(complete, key=lambda r: float(r["score"]))
    assert best == {
        "model": {
            "lr": float(chosen["model.lr"]),
            "temperature": float(chosen["model.temperature"]),
        }
    }
    assert float(chosen["score"]) >= float(complete[0]["score"])
    assert f"best: trial {chosen['trial']}" in printed
    # the trial's own run agrees with the table: the best validation of its only seed
    summary = json.loads(
        (output / "trials" / chosen["trial"] / "seed0" / "summary.json").read_text()
    )
    assert float(chosen["score"]) == pytest.approx(summary["best"]["rsum"], abs=1e-3)
    assert (output / "tuning.png").read_bytes().startswith(b"\x89PNG")

    monkeypatch.setenv("ADAPTALIGN_CACHE", str(output.parent / "cache"))
    monkeypatch.chdir(tmp_path)
    code = cli_main(
        [
            "fit",
            "--config",
            TINY,
            "--config",
            str(output / "best.yaml"),
            f"--model.text_tower.model_name={tiny_text_model}",
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert code == 0
    (saved,) = tmp_path.glob("**/config.yaml")
    fitted = yaml.safe_load(saved.read_text())["model"]
    assert (
        fitted["lr"] == best["model"]["lr"]
        and fitted["temperature"] == best["model"]["temperature"]
    )


@pytest.mark.slow
def test_a_trial_tune_stops_ends_its_fit_at_that_validation_and_ends_as_tune_expects(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tune stops a trial by raising ``SystemExit`` from the report; the trial must end with it
    too (returning instead leaves Tune's worker waiting for the trial forever)."""
    from adaptalign.experiments.tune_trial import run_trial

    monkeypatch.setenv("ADAPTALIGN_CACHE", str(tmp_path / "cache"))
    overrides = [f"--model.text_tower.model_name={tiny_text_model}", "--trainer.max_epochs=3"]
    study = read_study(study_file(tmp_path, overrides=overrides, seeds=[0, 1]))
    sent: list[dict] = []

    def send(metrics: dict) -> None:
        sent.append(metrics)
        if len(sent) == 2:
            raise SystemExit(0)

    with pytest.raises(SystemExit):
        run_trial(study, "t1", {"model.lr": 0.003, "model.temperature": 0.1}, send, True, 0.0)
    assert [m["epoch"] for m in sent] == [0, 1]  # stopped at its second validation
    folder = tmp_path / "out" / "trials" / "t1"
    assert not (folder / "seed0" / "summary.json").exists()  # the fit ended there
    assert not (folder / "seed1").exists()  # and the trial with it


@pytest.mark.slow
def test_a_trial_on_a_selection_split_never_evaluates_the_report_split(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial only selects: its fit validates on the carved selection split and ends without
    the evaluation of the report split (dev) that a plain fit with a selection split ends with."""
    from adaptalign.experiments.tune_trial import run_trial

    monkeypatch.setenv("ADAPTALIGN_CACHE", str(tmp_path / "cache"))
    overrides = [
        f"--model.text_tower.model_name={tiny_text_model}",
        "--trainer.max_epochs=1",
        "--data.generated.num_test=0",  # train and dev only, as Flickr8k in ../shared
        "--data.selection_images=16",
    ]
    study = read_study(study_file(tmp_path, overrides=overrides, seeds=[0]))
    sent: list[dict] = []
    run_trial(study, "t1", {"model.lr": 0.003, "model.temperature": 0.1}, sent.append, True, 0.0)
    summary = json.loads(
        (tmp_path / "out" / "trials" / "t1" / "seed0" / "summary.json").read_text()
    )
    assert [m["epoch"] for m in sent] == [0] and summary["best"]["rsum"] == sent[0]["value"]
    assert "report" not in summary
    assert not any(k.startswith("test/") for k in summary["best"])
