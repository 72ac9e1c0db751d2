"""Method overlays compose by layering: each method sits under its own ``methods.<key>``."""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path

import pytest
import yaml

from adaptalign.callbacks.arl import ARL
from adaptalign.callbacks.curriculum import ObjectCurriculum
from adaptalign.callbacks.loss_weighting import LossWeighting
from adaptalign.callbacks.parameter_summary import ParameterSummary
from adaptalign.callbacks.temperature_schedule import CosineTemperatureSchedule, TemperatureSchedule
from adaptalign.cli import main
from adaptalign.lightning_cli.cli import build_cli
from adaptalign.lightning_cli.methods import METHODS
from tests.helpers.builders import COMBINED_METHODS

ROOT = Path(__file__).parents[1]
METHOD_FILES = ROOT / "configs" / "methods"
TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
VARIANTS = ("arl_short", "arl_light_bias", "arl_no_floor", "arl_warmup_gamma")


def overlay(name: str) -> dict:
    return yaml.safe_load((METHOD_FILES / f"{name}.yaml").read_text())


def method_overlays() -> dict[str, str]:
    """Each shipped overlay that sets a method (variants aside) and the key it sets."""
    found = {}
    for path in sorted(METHOD_FILES.glob("*.yaml")):
        methods = yaml.safe_load(path.read_text()).get("methods")
        if methods and path.stem not in VARIANTS:
            (key,) = methods
            found[path.stem] = key
    return found


def printed(capsys: pytest.CaptureFixture, *layers: str) -> dict:
    monkey_args = [arg for layer in layers for arg in ("--config", layer)]
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "configs/quickstart.yaml", *monkey_args, "--print_config"])
    assert done.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def expected_settings(name: str, key: str) -> dict:
    """The settings the overlay gives its method (``init_args`` when it names a class)."""
    given = overlay(name)["methods"][key]
    return given.get("init_args", given) if "class_path" in given else given


def test_every_method_has_shipped_overlays() -> None:
    assert set(method_overlays().values()) == set(METHODS)
    assert len(method_overlays()) == 10  # 3 schedules, 5 loss weightings (2 fixed), TOnICS, ARL


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pair
        for pair in itertools.combinations(method_overlays(), 2)
        if method_overlays()[pair[0]] != method_overlays()[pair[1]]
    ],
)
@pytest.mark.slow
def test_every_pair_of_method_overlays_layers(
    first: str, second: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both methods are in the printed config, each with its own overlay's settings."""
    monkeypatch.chdir(ROOT)
    config = printed(capsys, f"configs/methods/{first}.yaml", f"configs/methods/{second}.yaml")
    for name in (first, second):
        key = method_overlays()[name]
        settings = config["methods"][key]
        module, _, cls = settings["class_path"].rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), cls), METHODS[key]), name
        for setting, value in expected_settings(name, key).items():
            assert settings["init_args"][setting] == pytest.approx(value), (name, setting)
    unset = set(METHODS) - {method_overlays()[first], method_overlays()[second]}
    assert all(config["methods"][key] is None for key in unset)


def test_two_overlays_of_one_method_replace_each_other(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    config = printed(
        capsys, "configs/methods/mmts_infonce.yaml", "configs/methods/cosine_temperature.yaml"
    )
    assert config["methods"]["mmts"]["class_path"].endswith("CosineTemperatureSchedule")
    assert config["methods"]["mmts"]["init_args"]["t_max"] == 0.11


@pytest.mark.parametrize(
    ("variant", "setting", "value"),
    [
        ("arl_short", "warmup_epochs", 1),
        ("arl_light_bias", "gamma", 0.5),
        ("arl_no_floor", "entropy_share_floor", None),
        ("arl_warmup_gamma", "warmup_bias_weight", None),
    ],
)
def test_a_variant_changes_one_value_of_the_method_below(
    variant: str,
    setting: str,
    value: object,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    config = printed(capsys, "configs/methods/arl.yaml", f"configs/methods/{variant}.yaml")
    expected = {**overlay("arl")["methods"]["arl"], setting: value}
    assert config["methods"]["arl"]["init_args"] == {**expected, "num_clusters": None}
    assert sum(1 for line in (METHOD_FILES / f"{variant}.yaml").read_text().splitlines()
               if not line.startswith("#")) <= 3  # fmt: skip


def test_caption_clusters_are_one_shared_block(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every overlay that needs clusters includes the one block file instead of a copy."""
    monkeypatch.chdir(ROOT)
    block = yaml.safe_load((ROOT / "configs" / "blocks" / "caption_clusters.yaml").read_text())
    users = [
        p for p in METHOD_FILES.glob("*.yaml") if "clusters" in (overlay(p.stem).get("data") or {})
    ]
    assert {p.stem for p in users} >= {"caption_clusters", "mmts_infonce", "mmts_max_margin", "arl"}
    for path in users:
        assert overlay(path.stem)["data"]["clusters"] == "../blocks/caption_clusters.yaml"
    config = printed(capsys, "configs/methods/arl.yaml")
    assert {k: config["data"]["clusters"][k] for k in block} == block


@pytest.mark.parametrize("model_summary", ["false", "true"])
def test_the_combined_configuration_is_the_four_overlays_layered(
    tiny_text_model: str, tmp_path: Path, model_summary: str
) -> None:
    """Built for real: the four methods run, in MM-TS, loss weights, TOnICS, ARL order, before
    the default callbacks, with the settings the combined configuration always had; also with
    the model summary on (every shipped config but the tests' leaves it on, and the summary's
    own callback once took the methods' place)."""
    args = ["--config", TINY, *(arg for layer in COMBINED_METHODS for arg in ("--config", layer))]
    args += [f"--trainer.enable_model_summary={model_summary}"]
    args += [f"--model.text_tower.model_name={tiny_text_model}"]
    args += [f"--data.clusters.text_model={tiny_text_model}", "--data.clusters.num_clusters=4"]
    args += [f"--data.cache_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"]
    trainer = build_cli(args, run=False).trainer
    kinds = [type(c) for c in trainer.callbacks]
    methods = [k for k in kinds if k in (TemperatureSchedule, LossWeighting, ObjectCurriculum, ARL)]
    assert methods == [TemperatureSchedule, LossWeighting, ObjectCurriculum, ARL]
    assert kinds[:4] == methods  # ahead of the checkpoints, the writers and the reports
    schedule, weighting, curriculum, arl = trainer.callbacks[:4]
    assert (schedule.alpha, schedule.oscillations) == (0.08, 5)
    assert (schedule.shift_min, schedule.shift_max) == (0.05, 0.20)
    assert (weighting.signal, weighting.w_min, weighting.w_max) == ("variance", 0.5, 1.5)
    assert curriculum.schedule == "ramp"
    assert (arl.gamma, arl.temperature, arl.warmup_epochs) == (4.0, 4.0, 1)
    assert not any(isinstance(c, CosineTemperatureSchedule) for c in trainer.callbacks)
    summaries = [c for c in trainer.callbacks if isinstance(c, ParameterSummary)]
    assert len(summaries) == (model_summary == "true")


def test_a_method_set_to_null_is_off(tiny_text_model: str, tmp_path: Path) -> None:
    args = ["--config", TINY, "--config", str(METHOD_FILES / "loss_weight_variance.yaml")]
    args += [f"--model.text_tower.model_name={tiny_text_model}", f"--data.cache_dir={tmp_path}"]
    args += [f"--trainer.default_root_dir={tmp_path}"]
    on = build_cli(args, run=False).trainer
    off = build_cli([*args, "--methods.loss_weighting=null"], run=False).trainer
    assert sum(isinstance(c, LossWeighting) for c in on.callbacks) == 1
    assert not any(isinstance(c, LossWeighting) for c in off.callbacks)
