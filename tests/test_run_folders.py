"""Where runs write and what a command prints at its end: a version folder claimed by one run only,
a resumed run logging on in its own folder, evaluations inside the run they evaluate, the rounded
tables, the checkpoint settings that replace the given ones, and no Lightning banners."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from adaptalign.cli import main
from adaptalign.lightning_cli.cli import build_cli

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


def arguments(tiny_text_model: str, root: Path, command: str, *extra: str) -> list[str]:
    return [
        command,
        "--config",
        TINY,
        f"--model.text_tower.model_name={tiny_text_model}",
        f"--trainer.default_root_dir={root}",
        f"--data.cache_dir={root / 'cache'}",
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(tiny_text_model: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One 2-epoch fit with the model summary on: its root folder and what it printed."""
    root = tmp_path_factory.mktemp("fitted")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(
            arguments(
                tiny_text_model,
                root,
                "fit",
                "--trainer.max_epochs=2",
                "--trainer.enable_model_summary=true",
            )
        )
    return root, printed.getvalue()


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard holds for a folder (all its event files), as (step, value)."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def printed_table(text: str, prefix: str) -> dict[str, list[str]]:
    """The rows of a printed metric table: name -> its cells as printed."""
    rows = [line.split() for line in text.splitlines() if line.startswith(prefix)]
    return {row[0]: row[1:] for row in rows}


# ------------------------------------------------------------------ the end of fit
@pytest.mark.slow
def test_fit_ends_with_last_and_best_validation_checkpoints_and_folder(
    fitted: tuple[Path, str],
) -> None:
    root, out = fitted
    version = root / "lightning_logs" / "version_0"
    logged = scalars(version)
    assert "fit ended after 2 epochs (6 steps)" in out  # 48 images / 16 per batch x 2 epochs
    rows = printed_table(out, "val/")
    assert next(iter(rows)) == "val/rsum"  # the selection metric heads the table
    history = logged["val/rsum"]
    best = max(range(len(history)), key=lambda i: history[i][1])  # the first of equal values
    assert f"last (epoch 1)  best (epoch {best})" in out
    for tag, cells in rows.items():
        assert cells == [f"{logged[tag][-1][1]:.2f}", f"{logged[tag][best][1]:.2f}"], tag
    assert all(re.fullmatch(r"\d+\.\d\d", cell) for cells in rows.values() for cell in cells)
    best_path = re.search(r"best by val/rsum: (\S+)", out).group(1)
    last_path = re.search(r"^  last: (\S+)", out, re.MULTILINE).group(1)
    assert Path(best_path).is_file() and Path(best_path).name.startswith(f"best-epoch={best}-")
    assert Path(last_path) == version / "checkpoints" / "last.ckpt"
    assert f"logs and config: {version}" in out
    assert out.rstrip().endswith(f"logs and config: {version}")  # the last thing fit prints


def test_fit_prints_no_flops_and_logs_no_hp_metric(fitted: tuple[Path, str]) -> None:
    """The summary keeps the parameter counts; FLOPs read 0 (no example input) and are gone."""
    root, out = fitted
    assert re.search(r"\d+(\.\d)? K trainable parameters", out)
    assert "image_tower" in out and "FLOPs" not in out
    assert "hp_metric" not in scalars(root / "lightning_logs" / "version_0")


# ------------------------------------------------------------------ version folders
@pytest.mark.slow
def test_two_runs_started_together_claim_different_version_folders(
    tiny_text_model: str, tmp_path: Path
) -> None:
    """Both trainers exist before either has written anything: the moment two processes race."""
    args = arguments(tiny_text_model, tmp_path, "fit")[1:]
    first = build_cli(args, run=False).trainer
    second = build_cli(args, run=False).trainer
    folders = {Path(first.log_dir), Path(second.log_dir)}
    assert folders == {tmp_path / "lightning_logs" / f"version_{n}" for n in (0, 1)}
    assert all(folder.is_dir() for folder in folders)  # claimed on creation, not at first write


def test_a_number_taken_after_the_listing_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process lists the same folders, then creates version_0 and version_1 first."""
    from adaptalign.lightning_cli import run_folder

    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_1").mkdir()
    monkeypatch.setattr(run_folder, "existing_versions", lambda root: [])  # the stale listing
    assert run_folder.claim_version(tmp_path) == tmp_path / "version_2"
    assert run_folder.claim_version(tmp_path) == tmp_path / "version_3"


def test_a_version_chosen_in_the_config_is_kept(tmp_path: Path) -> None:
    """``adaptalign compare`` resumes a run by naming its folder; nothing else is claimed."""
    from adaptalign.lightning_cli.run_folder import destination

    ckpt = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.touch()
    given = {"save_dir": str(tmp_path), "name": "", "version": "version_0"}
    assert destination("fit", given, str(ckpt)).version == "version_0"
    # a checkpoint outside any run's checkpoints/ folder: a new folder, and the reason said
    loose = tmp_path / "loose.ckpt"
    loose.touch()
    elsewhere = destination("fit", {**given, "version": None}, str(loose))
    assert elsewhere.version is None and "not in the checkpoints/ folder of a run" in elsewhere.note


# ------------------------------------------------------------------ resuming
@pytest.mark.slow
def test_a_resumed_fit_logs_on_in_its_own_folder_and_names_the_settings_it_ignores(
    fitted: tuple[Path, str], tiny_text_model: str, tmp_path: Path, capsys
) -> None:
    shutil.copytree(fitted[0], tmp_path, dirs_exist_ok=True)
    version = tmp_path / "lightning_logs" / "version_0"
    last = version / "checkpoints" / "last.ckpt"
    args = ["--trainer.max_epochs=3", f"--ckpt_path={last}", "--model.lr=0.5"]
    main(arguments(tiny_text_model, tmp_path, "fit", *args))
    captured = capsys.readouterr()
    assert "model.lr: given 0.5, the checkpoint has 0.003" in captured.err
    assert captured.err.count("model.") == 1  # only the setting that differs is named
    assert f"logging to {version}" in captured.out
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    # one TensorBoard history: the two validations before the resumption and the one after it
    assert [step for step, _ in scalars(version)["val/rsum"]] == [2, 5, 8]
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 9 and saved["hyper_parameters"]["lr"] == 0.003
    assert "fit ended after 3 epochs (9 steps)" in captured.out


# ------------------------------------------------------------------ evaluating a run
@pytest.mark.slow
@pytest.mark.parametrize("command", ["validate", "test"])
def test_an_evaluation_writes_into_the_run_and_prints_rounded_metrics(
    command: str, fitted: tuple[Path, str], tiny_text_model: str, tmp_path: Path, capsys, caplog
) -> None:
    run = fitted[0] / "lightning_logs" / "version_0"
    caplog.set_level(logging.INFO)
    main(
        arguments(
            tiny_text_model, tmp_path, command, f"--ckpt_path={run / 'checkpoints/last.ckpt'}"
        )
    )
    out, err = capsys.readouterr()
    prefix = "val/" if command == "validate" else "test/"
    rows = printed_table(out, prefix)
    assert next(iter(rows)) == f"{prefix}rsum" and f"{prefix}i2t_R@1" in rows
    assert all(re.fullmatch(r"\d+\.\d\d", value) for (value,) in rows.values())
    assert "DataLoader 0" not in out  # Lightning's own, unrounded table
    folder = run / command / "version_0"
    assert (folder / "config.yaml").is_file()
    logged = {tag: values for tag, values in scalars(folder).items() if tag.startswith(prefix)}
    assert {tag: [f"{v:.2f}" for _, v in values] for tag, values in logged.items()} == rows
    assert not (tmp_path / "lightning_logs").exists()  # no run of its own beside the others
    assert "adaptalign: warning" not in err  # the given settings are the checkpoint's
    assert not [r for r in caplog.records if "Tip" in r.getMessage()]  # no advertisements


@pytest.mark.slow
def test_predict_writes_into_the_run_at_the_checkpoints_own_settings(
    fitted: tuple[Path, str], tiny_text_model: str, tmp_path: Path, capsys
) -> None:
    run = fitted[0] / "lightning_logs" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    args = [f"--ckpt_path={ckpt}", "--data.predict_split=val", "--model.embed_dim=64"]
    main(arguments(tiny_text_model, tmp_path, "predict", *args))
    err = capsys.readouterr().err
    assert f"adaptalign: warning: {ckpt} was saved with other model settings" in err
    assert "model.embed_dim: given 64, the checkpoint has 32" in err
    written = torch.load(run / "predict" / "version_0" / "predictions" / "embeddings_val.pt")
    assert written["image_embeddings"].shape == (16, 32)  # run at the checkpoint's 32 dimensions


# ------------------------------------------------------------------ the table itself
def test_the_table_rounds_to_two_decimals_and_puts_rsum_first() -> None:
    from adaptalign.callbacks.final_report import metrics, table

    found = metrics({"val/i2t_R@1": torch.tensor(96.4000015258789), "val/rsum": 500.0}, "val/")
    assert list(found) == ["val/rsum", "val/i2t_R@1"]
    lines = table({"value": found}).splitlines()
    assert [line.split() for line in lines] == [
        ["metric", "value"],
        ["val/rsum", "500.00"],
        ["val/i2t_R@1", "96.40"],
    ]
