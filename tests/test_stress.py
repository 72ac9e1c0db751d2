"""Noise in the data module (training and evaluation) and the ``adaptalign stress`` command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from adaptalign.callbacks.model_inputs import model_inputs
from adaptalign.cli import main
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.datamodules.noise import NoiseConfig, caption_vocabulary, noisy_records
from adaptalign.experiments.compare_runs import Run
from adaptalign.experiments.compare_stress import (
    aggregate_stress,
    stress_figure,
    stress_markdown,
    stress_rows,
)
from adaptalign.experiments.stress import noise_for, stressed_split, write
from adaptalign.lightning_cli.cli import build_cli
from adaptalign.lightning_modules.metric_names import RECALLS
from tests.helpers.builders import quiet_trainer, tiny_module

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


def data(cache: Path, **settings: object) -> AlignmentDataModule:
    return AlignmentDataModule(
        generated=GeneratedConfig(num_train=32, num_val=8, num_test=8, image_size=32),
        cache_dir=str(cache),
        batch_size=8,
        **settings,
    )


def val_batch(module: AlignmentDataModule, tiny_text_model: str, frozen: bool = False) -> dict:
    """The first validation batch as a trainer would build it (with the system's features)."""
    system = tiny_module(tiny_text_model, text={"freeze": frozen})
    trainer = quiet_trainer(max_epochs=1)
    trainer.strategy.connect(system)
    module.trainer = trainer
    trainer.datamodule = module  # type: ignore[misc]
    module.setup()
    module.model_inputs = model_inputs(system)  # what ModelInputsLink hands over at setup
    return next(iter(module.val_dataloader()))


def test_noisy_records_are_fixed_and_change_only_captions(tmp_path: Path) -> None:
    module = data(tmp_path)
    module.setup()
    records = module.splits["val"]
    vocabulary = caption_vocabulary(c for r in module.splits["train"] for c in r.captions)
    config = NoiseConfig(caption_rate=0.5, seed=3)
    once = noisy_records(records, config, vocabulary)
    assert once == noisy_records(records, config, vocabulary)  # same corruption every time
    assert [r.image_id for r in once] == [r.image_id for r in records]
    assert all(len(a.captions) == len(b.captions) for a, b in zip(once, records, strict=True))
    changed = sum(
        a != b
        for r, n in zip(records, once, strict=True)
        for a, b in zip(r.captions, n.captions, strict=True)
    )
    assert changed > len(records)  # most of the 5 x 8 captions change at rate 0.5
    assert noisy_records(records, NoiseConfig(image_rate=0.5), vocabulary) == records
    other = noisy_records(records, NoiseConfig(caption_rate=0.5, seed=4), vocabulary)
    assert other != once


def test_evaluation_noise_reaches_raw_batches(tiny_text_model: str, tmp_path: Path) -> None:
    clean = val_batch(data(tmp_path), tiny_text_model)
    noisy = val_batch(
        data(tmp_path, eval_noise=NoiseConfig(caption_rate=0.3, image_rate=0.5)), tiny_text_model
    )
    assert torch.equal(clean["image_id"], noisy["image_id"])
    assert clean["texts"] != noisy["texts"]
    assert not torch.equal(clean["images"], noisy["images"])
    again = val_batch(
        data(tmp_path, eval_noise=NoiseConfig(caption_rate=0.3, image_rate=0.5)), tiny_text_model
    )
    assert again["texts"] == noisy["texts"] and torch.equal(again["images"], noisy["images"])


def test_frozen_features_of_noisy_captions_are_the_towers_own(
    tiny_text_model: str, tmp_path: Path
) -> None:
    noise = NoiseConfig(caption_rate=0.4)
    clean = val_batch(data(tmp_path), tiny_text_model, frozen=True)
    module = data(tmp_path, eval_noise=noise)
    noisy = val_batch(module, tiny_text_model, frozen=True)
    assert "text_features" in noisy and noisy["texts"] != clean["texts"]
    tower = module.trainer.lightning_module.text_tower
    with torch.no_grad():
        expected = tower.encode(noisy["texts"])
    assert torch.allclose(noisy["text_features"], expected, atol=1e-5)
    assert not torch.allclose(noisy["text_features"], clean["text_features"])


def test_training_noise_is_used_in_fit(tiny_text_model: str, tmp_path: Path) -> None:
    seen: list[list[str]] = []

    class Texts(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(list(batch["texts"]))

    module = data(tmp_path, noise=NoiseConfig(caption_rate=0.5))
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[Texts()]).fit(
        tiny_module(tiny_text_model), module
    )
    clean = {c for r in module.splits["train"] for c in r.captions}
    trained = [t for batch in seen for t in batch]
    assert len(trained) == 32 and sum(t not in clean for t in trained) > 16


def test_noise_for_each_modality() -> None:
    assert noise_for(0.0, "both", 0) is None
    assert noise_for(0.2, "text", 1) == NoiseConfig(caption_rate=0.2, seed=1)
    assert noise_for(0.2, "image", 0) == NoiseConfig(image_rate=0.2)
    assert noise_for(0.3, "both", 0) == NoiseConfig(caption_rate=0.3, image_rate=0.3)


@pytest.mark.slow
def test_stress_command(
    tiny_text_model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    common = ["--config", TINY, "--model.text_tower.model_name", tiny_text_model]
    common += ["--data.cache_dir", str(tmp_path / "cache")]
    main(["fit", *common, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "2"])
    ckpt = next((tmp_path / "lightning_logs").glob("version_0/checkpoints/best-*.ckpt"))
    out = tmp_path / "stress"
    code = main(
        [
            "stress",
            *common,
            "--ckpt_path",
            str(ckpt),
            "--rates",
            "0.5",
            "0",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads((out / "stress.json").read_text())
    assert [r["rate"] for r in rows] == [0.0, 0.5]
    assert {"stress.csv", "stress.md", "stress.png"} <= {p.name for p in out.iterdir()}
    # Without a selection split the stress test stays on val, and says so.
    assert [r["split"] for r in rows] == ["val", "val"]
    assert "Retrieval on the validation split (val) in %." in (out / "stress.md").read_text()
    assert (out / "stress.csv").read_text().startswith("rate,modality,split,")
    assert (out / "stress.png").stat().st_size > 1000
    # Rate 0 is exactly a plain validation of the checkpoint.
    cli = build_cli([*common, "--trainer.logger=false"], run=False)
    plain = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt))[0]
    assert rows[0]["rsum"] == pytest.approx(float(plain["val/rsum"]), abs=1e-6)
    assert f"{rows[0]['rsum']:.1f}" in (out / "stress.md").read_text()
    assert rows[1]["rsum"] != rows[0]["rsum"]


def test_stress_command_errors(
    tiny_text_model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    common = ["--config", TINY, "--model.text_tower.model_name", tiny_text_model]
    with pytest.raises(SystemExit) as done:
        main(["stress", *common, "--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert done.value.code == 2
    assert "missing.ckpt' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["stress", *common, "--ckpt_path", TINY, "--rates", "1.5"])
    assert done.value.code == 2
    assert "--rates: 1.5 is not a rate" in capsys.readouterr().err


def test_the_stressed_split_is_the_report_split_when_one_is_carved() -> None:
    assert stressed_split(None) == "val" and stressed_split("test") == "test"


def test_stress_outputs_name_their_split(tmp_path: Path) -> None:
    rows = [
        {"rate": rate, "modality": "text", "split": "test", "rsum": 100.0 - rate}
        | {m: 10.0 for m in RECALLS}
        for rate in (0.0, 0.5)
    ]
    write(rows, tmp_path, "text")
    assert "Retrieval on the report split (test) in %." in (tmp_path / "stress.md").read_text()
    with (tmp_path / "stress.csv").open() as handle:
        assert {r["split"] for r in csv.DictReader(handle)} == {"test"}


def stress_run(folder: Path, name: str, seed: int, split: str | None, rsum: float) -> Run:
    """A finished run's stress result on ``split`` (``None``: written before results named it)."""
    run = Run(name, TINY, 16, seed, folder / f"{name}_{seed}")
    (run.folder / "stress_text").mkdir(parents=True)
    entries = [
        {"rate": rate, "modality": "text", "rsum": rsum - rate}
        | ({"split": split} if split else {})
        | {m: 10.0 for m in RECALLS}
        for rate in (0.0, 0.5)
    ]
    (run.folder / "stress_text" / "stress.json").write_text(json.dumps(entries))
    return run


def test_a_comparisons_stress_results_name_their_split_and_never_pool_two(tmp_path: Path) -> None:
    reported = [stress_run(tmp_path, "mmts", seed, "test", 100.0 + seed) for seed in (0, 1)]
    groups = aggregate_stress(stress_rows(reported, "text"))
    assert {g["split"] for g in groups} == {"test"} and {g["seeds"] for g in groups} == {2}
    markdown = stress_markdown(groups, "text")
    assert "evaluated on the report split (test) with noise" in markdown
    assert "| mmts | 16 | 0.5 | 2 |" in markdown
    title = stress_figure(groups, "text", "Flickr8k").get_suptitle()
    assert title == "Flickr8k\nretrieval on the report split (test) under caption noise"

    # a result that does not name its split was on val; it is never averaged with test
    older = stress_run(tmp_path, "mmts", 2, None, 50.0)
    groups = aggregate_stress(stress_rows([*reported, older], "text"))
    assert sorted((g["split"], g["seeds"]) for g in groups if g["rate"] == 0) == [
        ("test", 2),
        ("val", 1),
    ]
    markdown = stress_markdown(groups, "text")
    assert "on the report split (test) or the validation split (val)" in markdown
    assert "| mmts | 16 | test | 0.5 | 2 |" in markdown
    assert "| mmts | 16 | val | 0 | 1 |" in markdown
    figure = stress_figure(groups, "text", "Flickr8k")
    assert [line.get_label() for line in figure.axes[0].containers] == [
        "mmts (test)",
        "mmts (val)",
    ]


@pytest.mark.slow
def test_stress_with_a_selection_split_is_on_the_report_split(
    tiny_text_model: str, tmp_path: Path, cache_dir: Path
) -> None:
    """With ``data.selection_images`` the stress test evaluates the report split: at rate 0 it
    gives the run's report, as ``adaptalign test`` of the checkpoint does."""
    summary = tmp_path / "summary.json"
    main(
        [
            "fit",
            "--config",
            TINY,
            "--model.text_tower.model_name",
            tiny_text_model,
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.max_epochs=2",
            "--data.generated.num_test=0",
            "--data.selection_images=16",
            "--trainer.callbacks+=adaptalign.callbacks.run_summary.RunSummary",
            f"--trainer.callbacks.output_path={summary}",
        ]
    )
    written = summary.read_text()
    report = json.loads(written)["report"]
    (version,) = tmp_path.glob("lightning_logs/version_*")
    out = tmp_path / "stress"
    # As a comparison runs it: the run's saved config and its selected checkpoint.
    config = str(version / "config.yaml")
    common = ["--config", config, "--ckpt_path", report["checkpoint"], "--output", str(out)]
    assert main(["stress", *common, "--rates", "0", "0.5", "--modality", "text"]) == 0
    rows = json.loads((out / "stress.json").read_text())
    assert [(r["rate"], r["split"]) for r in rows] == [(0.0, "test"), (0.5, "test")]
    for metric in (*RECALLS, "rsum"):
        assert rows[0][metric] == pytest.approx(report[metric], abs=1e-4)
    assert rows[1]["rsum"] != pytest.approx(rows[0]["rsum"])
    assert "Retrieval on the report split (test) in %." in (out / "stress.md").read_text()
    assert summary.read_text() == written  # the run's summary is left as it was
