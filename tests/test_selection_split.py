"""A selection split carved from train: select on it, report once on the data set's dev split."""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from adaptalign.callbacks.run_summary import report_entry
from adaptalign.cli import main
from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.clusters import ClusterConfig
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.datamodules.records import Record
from adaptalign.datamodules.selection import Selection, carve_selection, selection_size
from adaptalign.experiments.compare_results import (
    csv_text,
    report_markdown,
    splits_line,
    summary_row,
)
from adaptalign.lightning_cli.cli import selected_checkpoint
from tests.helpers.command_line import compare_here

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
# Train and dev only, like the Flickr8k this project is given: 40 train, 8 dev images.
TRAIN_DEV = GeneratedConfig(num_train=40, num_val=8, num_test=0, image_size=32)
# The tiny config's data with its test split dropped: 48 train, 16 dev images.
TRAIN_DEV_OPTIONS = ("--data.generated.num_test=0", "--data.selection_images=16")


def records(train: int, val: int = 3, test: int = 0) -> list[Record]:
    splits = ["train"] * train + ["val"] * val + ["test"] * test
    return [
        Record(Path(f"/x/{i:03d}.jpg"), (f"caption {i}",), i, split)
        for i, split in enumerate(splits)
    ]


def names(records: list[Record], split: str) -> set[str]:
    return {r.image_path.name for r in records if r.split == split}


def data(cache: Path, **settings: object) -> AlignmentDataModule:
    settings = {"generated": TRAIN_DEV, "selection_images": 8, "batch_size": 4, **settings}
    module = AlignmentDataModule(cache_dir=str(cache), **settings)  # type: ignore[arg-type]
    module.setup()
    return module


def ids(records: list[Record]) -> set[int]:
    return {r.image_id for r in records}


# ----------------------------------------------------------------------------- the carve


def test_the_carve_relabels_train_images_as_val_and_the_old_val_as_test() -> None:
    given = records(20, val=3)
    carved, selection = carve_selection(given, 5, split_seed=0)
    assert selection == Selection(5, 3, 15, 0)
    assert len(names(carved, "val")) == 5 and len(names(carved, "train")) == 15
    assert names(carved, "test") == names(given, "val")  # the dev images report
    assert names(carved, "val") < names(given, "train")
    assert not names(carved, "val") & names(carved, "train")
    assert [r.image_id for r in carved] == [r.image_id for r in given]  # file order kept


def test_the_carve_depends_on_the_split_seed_and_the_set_of_images_only() -> None:
    given = records(30)
    chosen = names(carve_selection(given, 6, split_seed=0)[0], "val")
    assert names(carve_selection(given, 6, split_seed=0)[0], "val") == chosen
    assert names(carve_selection(given, 6, split_seed=1)[0], "val") != chosen
    shuffled = list(given)
    random.Random(3).shuffle(shuffled)
    assert names(carve_selection(shuffled, 6, split_seed=0)[0], "val") == chosen


def test_a_fraction_of_train_and_a_whole_float_count() -> None:
    assert selection_size(0.25, 100) == 25
    assert selection_size(10.0, 100) == selection_size(10, 100) == 10
    assert selection_size(0.001, 100) == 1  # at least one image


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (0, r"data\.selection_images=0; expected a count >= 1"),
        (-3, r"data\.selection_images=-3; expected a count >= 1"),
        (0.0, r"data\.selection_images=0\.0; a fraction of the train split must lie in \(0, 1\)"),
        (1.0, r"data\.selection_images=1\.0; a fraction of the train split must lie in \(0, 1\)"),
        (20, r"data\.selection_images=20 asks for 20 images but the train split has 20"),
        (25, r"data\.selection_images=25 asks for 25 images but the train split has 20"),
        (0.99, r"data\.selection_images=0\.99 asks for 20 images but the train split has 20"),
        (True, r"data\.selection_images=True; expected a count or a fraction"),
    ],
)
def test_bad_sizes_are_refused_naming_the_setting(size: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        carve_selection(records(20), size, split_seed=0)  # type: ignore[arg-type]


def test_a_data_set_with_a_test_split_is_refused() -> None:
    """It selects on val and reports on test already: the option would only lose data."""
    with pytest.raises(
        ConfigurationError, match=r"data\.selection_images=5: .* already has a test"
    ):
        carve_selection(records(20, val=3, test=2), 5, split_seed=0)
    with pytest.raises(ConfigurationError, match="select on val and report on test without"):
        carve_selection(records(20, val=3, test=2), 5, split_seed=0)


def test_an_empty_report_split_is_refused() -> None:
    with pytest.raises(
        ConfigurationError, match=r"data\.selection_images=5: the val split .* report"
    ):
        carve_selection(records(20, val=0), 5, split_seed=0)


# ------------------------------------------------------------------------ the data module


def test_the_data_module_selects_on_carved_images_and_reports_on_dev(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        module = data(tmp_path)
    plain = AlignmentDataModule(generated=TRAIN_DEV, cache_dir=str(tmp_path), batch_size=4)
    plain.setup()
    assert len(module.splits["val"]) == 8 and len(module.splits["train"]) == 32
    assert ids(module.splits["val"]) < ids(plain.splits["train"])  # carved from train
    assert ids(module.splits["test"]) == ids(plain.splits["val"])  # the report split is dev
    assert not ids(module.splits["train"]) & ids(module.splits["val"])
    assert not ids(module.splits["train"]) & ids(module.splits["test"])
    assert module.selection == Selection(8, 8, 32, 0)
    assert (
        caplog.text.count(
            "selection split: 8 images carved from train (split_seed 0); report split: the 8 dev "
            "images (the data set's own val split, evaluated once after fit); training draws from "
            "the remaining 32"
        )
        == 1
    )
    # the records kept agree with the splits (clusters are fitted on what remains of train)
    assert ids(r for r in module.records if r.split == "train") == ids(module.splits["train"])


@pytest.mark.parametrize("train_images", [None, 4, 16, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_selection_split_is_the_same_for_every_seed_and_size(
    tmp_path: Path, seed: int, train_images: int | float | None
) -> None:
    reference = data(tmp_path)
    module = data(tmp_path, seed=seed, train_images=train_images)
    assert ids(module.splits["val"]) == ids(reference.splits["val"])
    assert ids(module.splits["test"]) == ids(reference.splits["test"])
    # the subsets come from the rest of train only
    assert ids(module.splits["train"]) <= ids(reference.splits["train"])
    assert not ids(module.splits["train"]) & ids(module.splits["val"])


def test_subsets_stay_nested_within_the_rest_of_train(tmp_path: Path) -> None:
    small, large = data(tmp_path, train_images=8, seed=3), data(tmp_path, train_images=16, seed=3)
    assert ids(small.splits["train"]) < ids(large.splits["train"])
    assert ids(data(tmp_path, train_images=8, seed=4).splits["train"]) != ids(small.splits["train"])


def test_methods_that_change_the_data_keep_the_selection_split(
    tmp_path: Path, tiny_text_model: str
) -> None:
    reference = ids(data(tmp_path).splits["val"])
    curriculum = data(tmp_path, sampler="curriculum", seed=2)
    clusters = data(tmp_path, clusters=ClusterConfig(num_clusters=3, text_model=tiny_text_model))
    assert ids(curriculum.splits["val"]) == reference == ids(clusters.splits["val"])
    assert clusters.cluster_sizes is not None
    assert clusters.cluster_sizes.sum() == sum(len(r.captions) for r in clusters.splits["train"])


def test_a_subset_larger_than_the_rest_of_train_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"after data\.selection_images took 8"):
        data(tmp_path, train_images=33)


def test_generated_data_with_a_test_split_is_refused(tmp_path: Path) -> None:
    config = GeneratedConfig(num_train=40, num_val=8, num_test=8, image_size=32)
    with pytest.raises(ConfigurationError, match=r"data\.generated\.num_test: 0"):
        data(tmp_path, generated=config)


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_flickr8k_without_a_test_list(tmp_path: Path) -> None:
    """Flickr8k as given here: train and dev lists, no test list."""
    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    image_names = [f"{i}.jpg" for i in range(12)]
    for i, name in enumerate(image_names):
        write_image(tmp_path / "Flickr8k_Dataset" / name, i)
    tokens = [f"{name}#{k}\tcaption {k} of {name}" for name in image_names for k in range(2)]
    (text / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(image_names[:9]) + "\n")
    (text / "Flickr_8k.devImages.txt").write_text("\n".join(image_names[9:]) + "\n")
    module = AlignmentDataModule(
        annotations=str(text / "Flickr8k.token.txt"), selection_images=3, batch_size=2
    )
    module.setup()
    assert [len(module.splits[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    assert {r.image_path.name for r in module.splits["test"]} == set(image_names[9:])


def test_a_seeded_split_without_test_images(tmp_path: Path) -> None:
    """CSV, Flickr30k and COCO files get a seeded split: test_images: 0 leaves train and dev."""
    lines = ["image,caption"]
    for i in range(10):
        write_image(tmp_path / "Images" / f"{i}.jpg", i)
        lines.append(f"{i}.jpg,caption of {i}")
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    settings = {"annotations": str(tmp_path / "captions.csv"), "val_images": 2, "batch_size": 2}
    module = AlignmentDataModule(test_images=0, selection_images=0.25, **settings)  # type: ignore[arg-type]
    module.setup()
    assert [len(module.splits[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    with pytest.raises(ConfigurationError, match="already has a test split"):
        AlignmentDataModule(test_images=1, selection_images=2, **settings).setup()  # type: ignore[arg-type]


# ------------------------------------------------------------------------- command line


def fit(text_model: str, root: Path, *extra: str) -> Path:
    """``adaptalign fit`` of the tiny config on train/dev data with a selection split; its
    summary's path."""
    summary = root / "summary.json"
    main(
        [
            "fit",
            "--config",
            TINY,
            "--model.text_tower.model_name",
            text_model,
            "--trainer.default_root_dir",
            str(root),
            "--trainer.max_epochs=3",
            *TRAIN_DEV_OPTIONS,
            *extra,
            "--trainer.callbacks+=adaptalign.callbacks.run_summary.RunSummary",
            f"--trainer.callbacks.output_path={summary}",
        ]
    )
    return summary


@pytest.fixture()
def split_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    """Every evaluation loader built: (split, trainer stage, epochs trained so far)."""
    reads: list[tuple[str, str, int]] = []
    original = AlignmentDataModule._eval_loader

    def recorded(self: AlignmentDataModule, split: str, shard: bool = True) -> object:
        trainer = self.trainer
        done = trainer.fit_loop.epoch_progress.current.completed
        reads.append((split, trainer.state.fn.value, done))
        return original(self, split, shard)

    monkeypatch.setattr(AlignmentDataModule, "_eval_loader", recorded)
    return reads


@pytest.mark.slow
def test_fit_reports_once_on_test_after_fit_from_the_best_checkpoint(
    tiny_text_model: str,
    tmp_path: Path,
    cache_dir: Path,
    split_reads: list[tuple[str, str, int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    summary = json.loads(fit(tiny_text_model, tmp_path).read_text())
    printed = capsys.readouterr().out
    # the report split is read once, by the evaluation after fit, never before
    assert [read for read in split_reads if read[0] == "test"] == [("test", "test", 3)]
    assert split_reads[-1][0] == "test" and {r[0] for r in split_reads[:-1]} == {"val"}

    (version,) = tmp_path.glob("lightning_logs/version_*")
    events = EventAccumulator(str(version))
    events.Reload()
    assert len(events.Scalars("test/rsum")) == 1  # logged once
    assert len(events.Scalars("val/rsum")) == 3

    best = max(summary["history"], key=lambda entry: entry["rsum"])
    report = summary["report"]
    (checkpoint,) = version.glob("checkpoints/best-*.ckpt")
    assert report["checkpoint"] == str(checkpoint)
    assert checkpoint.name.startswith(f"best-epoch={best['epoch']}-")
    assert (report["split"], report["selected_on"], report["epoch"]) == (
        "test",
        "val",
        best["epoch"],
    )
    assert report["rsum"] == pytest.approx(events.Scalars("test/rsum")[0].value, abs=1e-3)
    assert report["splits"] == {
        "selected_on": "val",
        "selection_images": 16,
        "carved_from": "train",
        "split_seed": 0,
        "reported_on": "test",
        "report_images": 16,
        "report_source": "dev",
        "remaining_train_images": 32,
    }
    assert f"test, report (epoch {best['epoch']})" in printed
    assert "val, best (epoch" in printed and "val, last (epoch 2)" in printed
    assert "test results" not in printed  # one table, the report beside the validations

    # the same checkpoint evaluated by `adaptalign test` gives the report
    main(
        [
            "test",
            "--config",
            str(version / "config.yaml"),
            "--ckpt_path",
            str(checkpoint),
            "--trainer.default_root_dir",
            str(tmp_path / "test"),
        ]
    )
    tested = capsys.readouterr().out
    assert f"test/rsum  {report['rsum']:.2f}".split() == next(
        line.split() for line in tested.splitlines() if line.startswith("test/rsum")
    )


def poison_the_report_split(cache: Path) -> int:
    """Noise in place of every dev image of the generated data in ``cache``; how many."""
    (dataset,) = cache.glob("generated/*/dataset_generated.json")
    entries = json.loads(dataset.read_text())["images"]
    dev = [e for e in entries if e["split"] == "val"]
    for index, entry in enumerate(dev):
        path = dataset.parent / entry["filepath"] / entry["filename"]
        pixels = np.random.default_rng(index).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return len(dev)


@pytest.mark.slow
def test_a_poisoned_report_split_changes_the_report_and_nothing_selected(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing reads the report split before the selection is final: with its images replaced by
    noise, every validation, the best epoch and the checkpoint chosen stay as they were."""
    clean, poisoned = tmp_path / "clean", tmp_path / "poisoned"
    monkeypatch.setenv("ADAPTALIGN_CACHE", str(clean / "cache"))
    first = json.loads(fit(tiny_text_model, clean).read_text())
    shutil.copytree(clean / "cache" / "generated", poisoned / "cache" / "generated")
    assert poison_the_report_split(poisoned / "cache") == 16
    monkeypatch.setenv("ADAPTALIGN_CACHE", str(poisoned / "cache"))
    second = json.loads(fit(tiny_text_model, poisoned).read_text())

    assert second["history"] == pytest.approx(first["history"])
    assert second["best"] == pytest.approx(first["best"])
    names = [Path(s["report"]["checkpoint"]).name for s in (first, second)]
    assert names[0] == names[1] and second["report"]["epoch"] == first["report"]["epoch"]
    assert second["report"]["rsum"] != pytest.approx(first["report"]["rsum"])


@pytest.mark.slow
def test_a_refused_setting_ends_the_command_with_one_line(
    tiny_text_model: str, tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fit(tiny_text_model, tmp_path, "--data.generated.num_test=16")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("adaptalign: error: data.selection_images=16: "), err
    assert "already has a test split (16 images)" in err[-1]


def test_without_a_checkpoint_that_monitors_rsum_the_last_epoch_is_reported() -> None:
    def checkpoint(monitor: str | None, path: str) -> SimpleNamespace:
        return SimpleNamespace(monitor=monitor, best_model_path=path)

    trainer = SimpleNamespace(
        checkpoint_callbacks=[checkpoint(None, "last.ckpt"), checkpoint("val/rsum", "best.ckpt")]
    )
    assert selected_checkpoint(trainer) == "best.ckpt"  # type: ignore[arg-type]
    trainer.checkpoint_callbacks = [checkpoint(None, "last.ckpt"), checkpoint("val/loss", "x")]
    assert selected_checkpoint(trainer) is None  # type: ignore[arg-type]
    trainer.checkpoint_callbacks = [checkpoint("val/rsum", "")]  # fast_dev_run saves none
    assert selected_checkpoint(trainer) is None  # type: ignore[arg-type]


def test_the_report_names_the_epoch_of_the_checkpoint_it_evaluated() -> None:
    fitted = {"best": {"epoch": 1, "step": 4}, "last": {"epoch": 2, "step": 6}}
    metrics = {"test/rsum": torch.tensor(150.0), "val/rsum": torch.tensor(99.0)}
    best = SimpleNamespace(ckpt_path="best-epoch=1-step=4.ckpt", callback_metrics=metrics)
    entry = report_entry(fitted, best, {"selection_images": 8})  # type: ignore[arg-type]
    assert (entry["epoch"], entry["selected_by"], entry["rsum"]) == (1, "best val/rsum", 150.0)
    assert entry["splits"] == {"selection_images": 8} and "val/rsum" not in entry
    last = SimpleNamespace(ckpt_path=None, callback_metrics=metrics)  # no best checkpoint
    entry = report_entry(fitted, last, None)  # type: ignore[arg-type]
    assert (entry["epoch"], entry["selected_by"], entry["checkpoint"]) == (2, "last epoch", None)


# --------------------------------------------------------------------------- comparisons

SPLITS = {
    "selected_on": "val",
    "selection_images": 1000,
    "carved_from": "train",
    "split_seed": 0,
    "reported_on": "test",
    "report_images": 1000,
    "report_source": "dev",
    "remaining_train_images": 5000,
}
HEADER = (
    "selected on val (selection split, 1000 images carved from train), "
    "reported on test (dev, 1000 images)"
)


def summary(best_rsum: float, report_rsum: float | None) -> dict:
    best = {"epoch": 1, "step": 4, "rsum": best_rsum, "i2t_R@1": 10.0}
    result = {"best": best, "last": {"epoch": 2, "rsum": best_rsum - 5}, "train_size": 48}
    if report_rsum is not None:
        result["report"] = {
            "split": "test",
            "selected_on": "val",
            "epoch": 1,
            "checkpoint": "best-epoch=1-step=4.ckpt",
            "splits": SPLITS,
            "rsum": report_rsum,
            "i2t_R@1": 7.0,
        }
    return result


def test_a_row_of_a_reported_run_holds_the_report_split() -> None:
    row = summary_row("a", "all", 0, summary(150.0, 120.0))
    assert (row["rsum"], row["i2t_R@1"], row["best_epoch"]) == (120.0, 7.0, 1)
    assert (row["selection_rsum"], row["last_rsum"]) == (150.0, 145.0)
    assert f"selected on {row['selected_on']}, reported on {row['reported_on']}" == HEADER
    plain = summary_row("a", "all", 0, summary(150.0, None))
    assert plain["rsum"] == 150.0 and "reported_on" not in plain


def test_the_header_names_the_splits_and_plain_comparisons_keep_their_wording() -> None:
    from adaptalign.experiments.compare_results import aggregate

    reported = [summary_row("a", "all", s, summary(150.0, 120.0 + s)) for s in (0, 1)]
    plain = [summary_row("a", "all", s, summary(150.0, None)) for s in (0, 1)]
    assert splits_line(reported) == HEADER
    assert splits_line(plain) is None
    assert splits_line([reported[0], plain[0]]) == (
        f"the runs differ in their splits: 1 run {HEADER}; 1 run selected and reported on val"
    )
    markdown = report_markdown(aggregate(reported), splits_line(reported))
    assert f"Retrieval in %, {HEADER}." in markdown and "| 120.5 ± 0.7 |" in markdown
    assert "Retrieval on the validation split" in report_markdown(aggregate(plain))
    header = next(csv.reader(io.StringIO(csv_text(reported))))
    assert header[-3:] == ["selected_on", "reported_on", "selection_rsum"]
    assert "reported_on" not in next(csv.reader(io.StringIO(csv_text(plain))))


@pytest.mark.slow
def test_a_comparison_with_a_selection_split_reports_the_report_split(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output = tmp_path / "out"
    args = ["--configs", TINY, "--jobs", "2"]
    _, printed, err = compare_here(output, tiny_text_model, args, TRAIN_DEV_OPTIONS)
    header = (
        "selected on val (selection split, 16 images carved from train), "
        "reported on test (dev, 16 images)"
    )
    assert f"\n{header}:\n| config |" in printed, printed + err
    # each run's progress line gives its report-split numbers and where its epoch was chosen
    done = [line for line in printed.splitlines() if " done in " in line]
    assert len(done) == 2 and all(", on test, epoch " in line for line in done), done
    assert all(", epoch " in line and " selected on val" in line for line in done), done
    with (output / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["seed"] for r in rows] == ["0", "1"]
    selections = []
    for r in rows:
        summary = json.loads(
            (output / "runs" / "tiny" / "nall" / f"seed{r['seed']}" / "summary.json").read_text()
        )
        report, best = summary["report"], summary["best"]
        assert float(r["rsum"]) == pytest.approx(report["rsum"])
        assert float(r["selection_rsum"]) == pytest.approx(best["rsum"])
        assert int(r["best_epoch"]) == report["epoch"] == best["epoch"]
        assert f"selected on {r['selected_on']}, reported on {r['reported_on']}" == header
        selections.append(report["splits"])
    assert selections[0] == selections[1]  # both seeds selected on the same carved images
    assert f"Retrieval in %, {header}." in (output / "results.md").read_text()
