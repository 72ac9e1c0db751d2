"""The command line as a user runs it: fit, validate, test, predict, --print_config, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from adaptalign.cli import main
from adaptalign.datamodules.generated_scenes import SHAPES
from tests.helpers.command_line import run_adaptalign

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


def run(tiny_text_model: str, root: Path, *extra: str) -> None:
    command, *rest = extra
    main(
        [
            command,
            "--config",
            TINY,
            "--model.text_tower.model_name",
            tiny_text_model,
            "--trainer.default_root_dir",
            str(root),
            *rest,
        ]
    )


@pytest.fixture(scope="module")
def trained_run(tiny_text_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short fit shared by the tests that need a checkpoint and logs."""
    root = tmp_path_factory.mktemp("run")
    cache = root / "cache"
    run(tiny_text_model, root, "fit", "--data.cache_dir", str(cache), "--trainer.max_epochs", "2")
    return root


@pytest.mark.slow
def test_fast_dev_run_fit(tiny_text_model: str, tmp_path: Path, cache_dir: Path) -> None:
    run(tiny_text_model, tmp_path, "fit", "--trainer.fast_dev_run", "true")
    # fast_dev_run writes no checkpoint and no config, but the generated data reached the cache.
    assert list(cache_dir.glob("generated/*/dataset_generated.json"))


@pytest.mark.slow
def test_last_checkpoint_is_the_last_epoch_even_when_it_is_not_the_best(
    tiny_text_model: str, tmp_path: Path, cache_dir: Path
) -> None:
    """With nothing learned (lr 0) the last epoch is not the best, so no best is written then."""
    run(tiny_text_model, tmp_path, "fit", "--trainer.max_epochs=3", "--model.lr=0")
    (folder,) = tmp_path.glob("lightning_logs/*/checkpoints")
    (best,) = folder.glob("best-*.ckpt")
    assert not best.name.startswith("best-epoch=2-")
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 9  # 48 images / 16 per batch x 3 epochs


@pytest.mark.slow
def test_fit_saves_config_logs_and_checkpoints(trained_run: Path) -> None:
    (version,) = (trained_run / "lightning_logs").iterdir()
    config = yaml.safe_load((version / "config.yaml").read_text())
    assert config["model"]["image_tower"]["model_name"] == "test_resnet"
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert list((version / "checkpoints").glob("best-*.ckpt"))
    events = EventAccumulator(str(version))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/loss_i2t",
        "train/loss_t2i",
        "train/temperature",
        "val/rsum",
        "val/i2t_R@1",
        "val/t2i_R@10",
        "val/i2t_medr",
        "lr-AdamW/projections",
        "lr-AdamW/towers",
    }
    assert expected <= tags, expected - tags
    # Two epochs: R@K is logged at each validation.
    assert len(events.Scalars("val/rsum")) == 2


@pytest.mark.slow
def test_same_seed_same_weights(tiny_text_model: str, trained_run: Path, tmp_path: Path) -> None:
    """A second run with the same config and seed ends with bit-identical weights."""
    cache = trained_run / "cache"
    run(
        tiny_text_model,
        tmp_path,
        "fit",
        "--data.cache_dir",
        str(cache),
        "--trainer.max_epochs",
        "2",
    )
    first = torch.load(next(trained_run.glob("lightning_logs/*/checkpoints/last.ckpt")))
    second = torch.load(next(tmp_path.glob("lightning_logs/*/checkpoints/last.ckpt")))
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key


@pytest.mark.slow
@pytest.mark.parametrize("command", ["validate", "test"])
def test_evaluate_from_checkpoint(
    command: str, tiny_text_model: str, trained_run: Path, tmp_path: Path, capsys
) -> None:
    ckpt = next(trained_run.glob("lightning_logs/*/checkpoints/last.ckpt"))
    run(
        tiny_text_model,
        tmp_path,
        command,
        "--ckpt_path",
        str(ckpt),
        "--data.cache_dir",
        str(trained_run / "cache"),
    )
    out = capsys.readouterr().out
    prefix = "val" if command == "validate" else "test"
    assert f"{prefix}/rsum" in out and f"{prefix}/i2t_R@1" in out


@pytest.mark.slow
def test_predict_writes_embeddings(tiny_text_model: str, trained_run: Path, tmp_path: Path) -> None:
    ckpt = next(trained_run.glob("lightning_logs/*/checkpoints/last.ckpt"))
    target = tmp_path / "emb.pt"
    run(
        tiny_text_model,
        tmp_path,
        "predict",
        "--ckpt_path",
        str(ckpt),
        "--data.predict_split",
        "val",
        "--trainer.callbacks+=adaptalign.callbacks.embedding_writer.EmbeddingWriter",
        f"--trainer.callbacks.output_path={target}",
    )
    result = torch.load(target)
    assert result["image_embeddings"].shape == (16, 32)
    assert result["text_embeddings"].shape == (80, 32)  # 5 captions per image
    assert torch.allclose(result["image_embeddings"].norm(dim=1), torch.ones(16), atol=1e-5)
    assert len(result["texts"]) == 80
    # text_image_id points every caption to an image of the file
    assert set(result["text_image_id"].tolist()) == set(result["image_id"].tolist())
    # the generated data knows each image's objects: the file carries each image's primary shape,
    # which one of its captions names (by the shape's name or a synonym)
    objects = result["image_objects"]
    assert len(objects) == 16
    for shape, image in zip(objects, result["image_id"].tolist(), strict=True):
        pairs = zip(result["texts"], result["text_image_id"].tolist(), strict=True)
        captions = [text for text, owner in pairs if owner == image]
        assert any(word in c for word in SHAPES[shape] for c in captions), (shape, captions)
    # the default writer put a copy in the evaluated run's folder as well
    assert list(ckpt.parents[1].glob("predict/version_*/predictions/embeddings_val.pt"))


def test_print_config(tiny_text_model: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_text_model, tmp_path, "fit", "--print_config")
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["embed_dim"] == 32
    assert printed["data"]["generated"]["num_train"] == 48


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.image_tower.model_name", "resnet_does_not_exist"], "is not a timm model"),
        (["--model.image_tower.checkpoint_path", "/nonexistent/w.pth"], "does not exist"),
        (["--model.embed_dim", "0"], r"embed_dim=0; expected an integer >= 1"),
        (["--model.temperature", "-0.5"], r"temperature=-0.5; expected a value in"),
        (["--model.temperature_bounds", "[0.0, 1.0]"], r"expected 0 < lower <= upper"),
        (["--model.text_tower.model_name", "./no/such/folder"], "does not exist"),
    ],
)
@pytest.mark.slow
def test_bad_settings_exit_with_one_clear_message(
    override: list[str], message: str, tiny_text_model: str, tmp_path: Path, capsys
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_text_model, tmp_path, "fit", *override)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("adaptalign: error:")
    assert __import__("re").search(message, err), err


@pytest.mark.ddp
def test_two_process_ddp_fit_on_cpu(tiny_text_model: str, tmp_path: Path) -> None:
    """The real launcher: `adaptalign fit` with DDP on 2 CPU processes trains and checkpoints."""
    args = ["fit", "--config", TINY, "--model.text_tower.model_name", tiny_text_model]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.strategy", "ddp"]
    result = run_adaptalign([*args, "--trainer.devices", "2"], tmp_path / "cache", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (ckpt,) = tmp_path.glob("lightning_logs/*/checkpoints/last.ckpt")
    state = torch.load(ckpt, weights_only=False)
    # 48 train images, 16 per process-batch, 2 processes: one full global batch per epoch.
    assert state["global_step"] == 1


ROOT = Path(__file__).parent.parent
BASES = [
    "configs/quickstart.yaml",
    "configs/flickr8k/base.yaml",
    "configs/generated/fixed_temperature.yaml",
]
OVERLAYS = sorted(
    str(p.relative_to(ROOT))
    for folder in ("configs/methods", "configs/trainer", "configs/flickr8k")
    for p in (ROOT / folder).glob("*.yaml")
    if p.name != "base.yaml"
)


@pytest.mark.parametrize(
    "configs",
    [[base] for base in BASES] + [["configs/quickstart.yaml", overlay] for overlay in OVERLAYS],
)
def test_shipped_configs_parse(configs: list[str], capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shipped config (and overlay) is valid for the CLI, without touching any data."""
    monkeypatch.chdir(Path(__file__).parent.parent)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *(arg for c in configs for arg in ("--config", c)), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    if "fixed_temperature.yaml" in configs[-1]:
        assert printed["model"]["learn_temperature"] is False
    if configs[-1].endswith("sgd.yaml"):
        assert printed["model"]["optimizer"] == "sgd" and printed["model"]["momentum"] == 0.9
        assert printed["model"]["weight_decay"] == 0.0
    if "flickr8k" in configs[0]:
        assert printed["model"]["image_tower"]["freeze"] is True
        assert printed["data"]["format"] == "flickr8k"


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "compare").rglob("*.yaml")), ids=str)
def test_comparison_files_plan_existing_configs(path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    main(["compare", "--config", str(path), "--dry-run"])
    assert "runs (" in capsys.readouterr().out
