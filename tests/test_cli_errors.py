"""Bad command lines end in one ``adaptalign: error:`` line with exit status 2.

A bad ``--ckpt_path`` or setting is found before any model or data is built: the tests that
expect so replace the building of classes with a failure, which a late check would run into.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from adaptalign.cli import main
from adaptalign.lightning_cli.checks import check_ckpt_path, setting_keys
from adaptalign.lightning_cli.cli import AlignmentCLI

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
EXPECTED = "expected a .ckpt file written by adaptalign fit, or last, best or hpc"


class BuiltClasses(Exception):
    """Raised in place of building the model, data and trainer."""


@pytest.fixture()
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: AlignmentCLI) -> None:
        raise BuiltClasses

    monkeypatch.setattr(AlignmentCLI, "instantiate_classes", refuse)


def error_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line ``adaptalign ARGS`` ends with; it must exit with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("adaptalign: error: "), err
    assert not any(word in err for word in ("Traceback", "usage:", "Union")), err
    return lines[-1].removeprefix("adaptalign: error: ")


def write_yaml(path: Path, settings: dict) -> str:
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def lightning_checkpoint(path: Path) -> Path:
    """What Lightning saves, in miniature: a zip written by torch.save holding a state_dict."""
    torch.save({"epoch": 0, "global_step": 0, "state_dict": {"w": torch.ones(4096)}}, path)
    return path


# ----------------------------------------------------------------------------- --ckpt_path


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_missing_checkpoint_is_named_before_anything_is_built(
    command: str, tmp_path: Path, nothing_built: None, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no_such.ckpt"
    line = error_line([command, "--config", TINY, "--ckpt_path", str(missing)], capsys)
    assert line == f"--ckpt_path '{missing}': no such file; {EXPECTED}"


def test_truncated_checkpoint_is_named_before_anything_is_built(
    tmp_path: Path, nothing_built: None, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = lightning_checkpoint(tmp_path / "whole.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole[: len(whole) // 2])  # what a writer killed mid-write leaves
    line = error_line(["validate", "--config", TINY, "--ckpt_path", str(cut)], capsys)
    assert line == (
        f"--ckpt_path '{cut}': not a Lightning checkpoint "
        f"(truncated, or not a file torch.save wrote); {EXPECTED}"
    )


def test_file_that_is_no_checkpoint_is_named(
    tmp_path: Path, nothing_built: None, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a checkpoint\n")
    line = error_line(["test", "--config", TINY, "--ckpt_path", str(notes)], capsys)
    assert line.startswith(f"--ckpt_path '{notes}': not a Lightning checkpoint (truncated")


def test_weights_without_state_dict_are_named(
    tmp_path: Path, nothing_built: None, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.ones(2), "conv.bias": torch.zeros(2)}, weights)
    line = error_line(["predict", "--config", TINY, "--ckpt_path", str(weights)], capsys)
    assert line == (
        f"--ckpt_path '{weights}': not a Lightning checkpoint (no 'state_dict'; it holds keys "
        f"['conv.bias', 'conv.weight']); {EXPECTED}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("value", ["last", "best", "hpc", "checkpoint"])
def test_special_values_and_checkpoints_go_on_to_build_the_run(
    value: str, tmp_path: Path, nothing_built: None
) -> None:
    """Lightning resolves last/best/hpc itself; a whole checkpoint passes the check."""
    if value == "checkpoint":
        value = str(lightning_checkpoint(tmp_path / "good.ckpt"))
    with pytest.raises(BuiltClasses):
        main(["validate", "--config", TINY, "--ckpt_path", value])


def test_check_leaves_folders_to_lightning(tmp_path: Path) -> None:
    """Sharded checkpoints are folders, which Lightning's strategies read themselves."""
    check_ckpt_path(tmp_path)


@pytest.mark.slow
def test_checkpoint_settings_this_version_lacks_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lightning parses the model settings saved in a checkpoint after the given ones."""
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"embed_dimm": 3}}, old)
    line = error_line(["validate", "--config", TINY, "--ckpt_path", str(old)], capsys)
    assert line == (
        f"--ckpt_path '{old}': the model settings saved in it do not fit: unknown setting "
        "'model.embed_dimm'; did you mean 'model.embed_dim'?"
    )


# ----------------------------------------------------------------------------- refusals


SCHEDULE = "adaptalign.callbacks.temperature_schedule.TemperatureSchedule"
REFUSAL = "alpha/2=0.45 must be < shift_min=0.05, or the temperature could reach 0 or below"


@pytest.mark.slow
@pytest.mark.parametrize("given_in", ["config", "command line"])
def test_a_callbacks_refusal_is_shown_alone(
    given_in: str, tiny_text_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if given_in == "config":
        callback = {"class_path": SCHEDULE, "init_args": {"alpha": 0.9}}
        overlay = write_yaml(tmp_path / "mmts.yaml", {"trainer": {"callbacks": [callback]}})
        extra = ["--config", overlay]
    else:
        extra = [f"--trainer.callbacks+={SCHEDULE}", "--trainer.callbacks.alpha", "0.9"]
    args = ["fit", "--config", TINY, "--model.text_tower.model_name", tiny_text_model, *extra]
    assert error_line([*args, "--trainer.default_root_dir", str(tmp_path)], capsys) == REFUSAL


# ----------------------------------------------------------------------------- misspelt keys


def test_misspelt_key_in_a_config_names_the_file_and_the_closest_key(
    tmp_path: Path, nothing_built: None, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write_yaml(tmp_path / "first.yaml", {"model": {"lr": 0.01}})
    typo = write_yaml(tmp_path / "typo.yaml", {"model": {"embed_dimm": 16}})
    line = error_line(["fit", "--config", TINY, "--config", typo, "--config", first], capsys)
    assert line == f"{typo}: unknown setting 'model.embed_dimm'; did you mean 'model.embed_dim'?"


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"model": {"image_tower": {"model_nam": "x"}}},
            "unknown setting 'model.image_tower.model_nam'; "
            "did you mean 'model.image_tower.model_name'?",
        ),
        (
            {"trainer": {"callbacks": [{"class_path": SCHEDULE, "init_args": {"alph": 0.01}}]}},
            "unknown setting 'trainer.callbacks.alph'; did you mean 'trainer.callbacks.alpha'?",
        ),
        ({"trainer": {"max_epohcs": 3}}, "unknown setting 'trainer.max_epohcs'; did you mean "),
        ({"model": {"zzz": 1}}, "unknown setting 'model.zzz'; see --help for the valid ones"),
        ({"model": {"embed_dim": "wide"}}, "model.embed_dim: Expected a <class 'int'>. Got value"),
    ],
)
def test_misspelt_nested_keys_and_bad_values_in_a_config(
    settings: dict,
    expected: str,
    tmp_path: Path,
    nothing_built: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    overlay = write_yaml(tmp_path / "overlay.yaml", settings)
    line = error_line(["fit", "--config", TINY, "--config", overlay], capsys)
    assert line.startswith(f"{overlay}: {expected}"), line


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (
            ["--model.embed_dimm", "3"],
            "unknown option --model.embed_dimm; did you mean --model.embed_dim?",
        ),
        (
            ["--model.image_tower.model_nam=x"],
            "unknown option --model.image_tower.model_nam; "
            "did you mean --model.image_tower.model_name?",
        ),
        (
            ["--model.embed_dim", "wide"],
            "--model.embed_dim: Expected a <class 'int'>. Got value: wide",
        ),
    ],
)
def test_misspelt_options_and_bad_values_on_the_command_line(
    option: list[str], expected: str, nothing_built: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert error_line(["fit", "--config", TINY, *option], capsys) == expected


def test_other_parse_errors_are_one_line(
    nothing_built: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert error_line(["fti", "--config", TINY], capsys).startswith(
        "unknown subcommand 'fti' (did you mean 'fit'?); expected one of fit, validate,"
    )


def test_setting_keys_follow_init_args_and_lists() -> None:
    tree = {"trainer": {"callbacks": [{"class_path": "x.Y", "init_args": {"alpha": 1}}]}}
    assert setting_keys(tree) == {
        "trainer",
        "trainer.callbacks",
        "trainer.callbacks.class_path",
        "trainer.callbacks.alpha",
    }


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (
            "--model.image_tower.unlocked_blocks=7",
            "model.image_tower.unlocked_blocks=7: test_resnet has 4 blocks",
        ),
        ("--model.text_tower.unlocked_layers=3", "model.text_tower.unlocked_layers=3: "),
        ("--model.image_tower.unlocked_blocks=-2", "model.image_tower.unlocked_blocks=-2; "),
    ],
)
def test_unlock_settings_the_towers_cannot_take_are_one_line(
    option: str, expected: str, tiny_text_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit", "--config", TINY, f"--model.text_tower.model_name={tiny_text_model}", option]
    assert error_line(args, capsys).startswith(expected)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            ["--data.shards=MISSING/train-{000000..000001}.tar", "--data.val_shards=MISSING/v.tar"],
            "data.shards: shard ",
        ),
        (["--data.shards=MISSING/train-000000.tar"], "data.format=webdataset needs data.val"),
        (["--data.shuffle_buffer=0"], "data.shuffle_buffer=0; expected an integer >= 1"),
    ],
)
def test_shard_settings_that_cannot_stream_are_one_line(
    options: list[str],
    expected: str,
    tiny_text_model: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    given = [option.replace("MISSING", str(tmp_path / "missing")) for option in options]
    if expected.startswith("data.format"):
        (tmp_path / "missing").mkdir()
        (tmp_path / "missing" / "train-000000.tar").write_bytes(b"")
    args = [
        "fit",
        "--config",
        TINY,
        f"--model.text_tower.model_name={tiny_text_model}",
        "--data.format=webdataset",
        *given,
    ]
    line = error_line(args, capsys)
    assert line.startswith(expected), line
    if expected == "data.shards: shard ":
        assert "does not exist" in line and "2 of 2" in line, line
