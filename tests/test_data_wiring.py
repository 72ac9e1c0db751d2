"""The data module only wires: prepare_data keeps nothing; plots and model inputs by callback."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DistributedSampler, SequentialSampler

from adaptalign.callbacks.cluster_plot import ClusterSizePlot
from adaptalign.callbacks.model_inputs import ModelInputsLink, model_inputs
from adaptalign.common.checks import is_finite_number, is_int, is_number
from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules import builder, clusters
from adaptalign.datamodules.builder import build_splits
from adaptalign.datamodules.clusters import ClusterConfig
from adaptalign.datamodules.curriculum_sampler import CurriculumBatchSampler
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.datasets import default_transform
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.datamodules.model_inputs import ModelInputs
from tests.helpers.builders import quiet_trainer, tiny_module

GENERATED = GeneratedConfig(num_train=32, num_val=8, num_test=8, image_size=32)


def data(cache: Path, **settings: object) -> AlignmentDataModule:
    return AlignmentDataModule(generated=GENERATED, cache_dir=str(cache), batch_size=8, **settings)


def with_clusters(cache: Path, text_model: str) -> AlignmentDataModule:
    return data(cache, clusters=ClusterConfig(num_clusters=4, text_model=text_model))


def no_kmeans(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("k-means ran although the labels were cached")

    monkeypatch.setattr(clusters, "run_kmeans", refuse)


# ------------------------------------------------------------------------- prepare_data


@pytest.mark.slow
def test_prepare_data_fills_the_cluster_cache_and_keeps_nothing(
    tmp_path: Path,
    tiny_text_model: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    module = with_clusters(tmp_path, tiny_text_model)
    with caplog.at_level(logging.INFO):
        module.prepare_data()
    assert module.splits == {} and module.records == [] and module.source == ""
    assert module.caption_clusters is None and module.cluster_sizes is None
    assert "caption clusters over" not in caplog.text  # setup reports them, once
    no_kmeans(monkeypatch)  # setup now reads the clustering prepare_data stored
    with caplog.at_level(logging.INFO):
        module.setup()
    assert module.splits["train"] and module.cluster_sizes is not None
    assert module.cluster_sizes.sum() == sum(len(r.captions) for r in module.splits["train"])
    assert caplog.text.count("caption clusters over") == 1


def test_prepare_data_under_one_process_leaves_the_records_to_setup(
    tmp_path: Path, tiny_text_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = with_clusters(tmp_path, tiny_text_model)
    module.trainer = quiet_trainer()
    built: list[object] = []
    monkeypatch.setattr(
        "adaptalign.datamodules.datamodule.build_splits",
        lambda settings: built.append(settings) or build_splits(settings),
    )
    module.prepare_data()
    assert built == [] and module.splits == {}
    module.setup()
    assert len(built) == 1 and module.caption_clusters is not None


def test_setup_keeps_what_the_builder_makes_of_the_settings(tmp_path: Path) -> None:
    module = data(tmp_path, sampler="curriculum", train_images=16, captions_per_image=2)
    module.setup()
    built = build_splits(module.split_settings())
    assert built.splits == module.splits and built.records == module.records
    assert built.source == module.source
    train = module.splits["train"]
    assert len(train) == 16 and all(len(r.captions) == 2 and r.objects for r in train)


# --------------------------------------------------------------------------- plots


def fit_logged(
    module: AlignmentDataModule, text_model: str, root: Path, callbacks: list
) -> TensorBoardLogger:
    logger = TensorBoardLogger(str(root), name="run")
    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=logger, callbacks=callbacks
    )
    trainer.fit(tiny_module(text_model), module)
    return logger


@pytest.mark.slow
def test_the_cluster_size_plot_comes_from_its_callback_only(
    tmp_path: Path, tiny_text_model: str
) -> None:
    plain = fit_logged(with_clusters(tmp_path, tiny_text_model), tiny_text_model, tmp_path, [])
    assert not list(Path(plain.log_dir).rglob("*.png"))  # the data module draws nothing

    plotted = fit_logged(
        with_clusters(tmp_path, tiny_text_model), tiny_text_model, tmp_path, [ClusterSizePlot()]
    )
    png = Path(plotted.log_dir) / "cluster_sizes.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cluster_size_plot_needs_clusters_and_a_logger(tmp_path: Path) -> None:
    plot = ClusterSizePlot()
    trainer = quiet_trainer(logger=TensorBoardLogger(str(tmp_path), name="run"))
    trainer.datamodule = data(tmp_path)  # type: ignore[misc]
    plot.setup(trainer, None, "fit")  # type: ignore[arg-type]
    assert not list(tmp_path.rglob("*.png"))


# ------------------------------------------------------------------- model inputs


def test_a_trainer_without_the_link_callback_is_told_which_to_add(
    tmp_path: Path, tiny_text_model: str
) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ConfigurationError, match=r"add adaptalign\.callbacks\.model_inputs\."):
        trainer.fit(tiny_module(tiny_text_model), data(tmp_path))


def test_the_link_hands_over_the_preprocessing_and_only_frozen_towers(
    tiny_text_model: str,
) -> None:
    trains = tiny_module(tiny_text_model)
    inputs = model_inputs(trains)
    assert inputs.image_tower is None and inputs.text_backbone is None
    assert repr(inputs.transform) == repr(trains.image_transform(False))

    frozen = tiny_module(tiny_text_model, image={"freeze": True}, text={"freeze": True})
    inputs = model_inputs(frozen)
    assert inputs.image_tower is frozen.image_tower
    assert inputs.text_backbone is frozen.text_tower.backbone
    assert repr(model_inputs(torch.nn.Identity()).transform) == repr(default_transform())


def test_the_link_reaches_the_data_module_before_its_loaders(
    tmp_path: Path, tiny_text_model: str
) -> None:
    system = tiny_module(tiny_text_model, image={"freeze": True})
    module = data(tmp_path)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(system, module)
    assert isinstance(module.model_inputs, ModelInputs)
    assert module.model_inputs.image_tower is system.image_tower
    assert trainer.train_dataloader.dataset.features.image is not None  # served from the cache
    assert len([c for c in trainer.callbacks if isinstance(c, ModelInputsLink)]) == 1


def test_a_data_module_on_its_own_uses_raw_inputs_and_the_default_preprocessing(
    tmp_path: Path,
) -> None:
    module = data(tmp_path)
    module.setup()
    batch = next(iter(module.val_dataloader()))
    assert "images" in batch and "image_features" not in batch
    assert batch["images"].shape[1:] == (3, 32, 32)  # not resized: the default keeps the size


# ---------------------------------------------------------------------------- sharding


class Ranks:
    """The parts of a trainer the data module reads (rank, world size, epoch)."""

    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size = rank, world
        self.is_global_zero, self.current_epoch = rank == 0, 0


def test_under_several_processes_the_data_module_shards_each_evaluation_split(
    tmp_path: Path,
) -> None:
    seen = []
    for rank in range(2):
        module = data(tmp_path)
        module.setup()
        module.trainer = Ranks(rank, 2)  # type: ignore[assignment]
        module.model_inputs = ModelInputs(default_transform())
        loader = module.val_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)  # Lightning leaves it as it is
        seen.append([int(i) for b in loader for i in b["image_id"]])
        assert module.predict_dataloader().sampler.__class__ is SequentialSampler
    assert sorted(seen[0] + seen[1]) == sorted(r.image_id for r in module.splits["val"])


def test_the_curriculum_sampler_refuses_to_be_rebuilt_around_a_distributed_sampler() -> None:
    # Lightning's use_distributed_sampler rebuilds a batch sampler as cls(sampler, batch_size=,
    # drop_last=); the curriculum shards its batches itself.
    lightning_sampler = DistributedSampler(range(16), num_replicas=2, rank=0)
    with pytest.raises(ConfigurationError, match="use_distributed_sampler: false"):
        CurriculumBatchSampler(lightning_sampler, batch_size=4, drop_last=True)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ checks


def test_one_set_of_checks_refuses_bools_and_takes_numpy_scalars() -> None:
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0)
    assert is_number(2.5) and is_number(np.float32(2.5)) and is_number(float("nan"))
    assert not is_number(False) and not is_number("1")
    assert is_finite_number(np.int8(1)) and not is_finite_number(float("inf"))
    assert not is_finite_number(float("nan")) and not is_finite_number(True)


def test_the_builder_needs_no_trainer(tmp_path: Path) -> None:
    settings = builder.SplitSettings(generated=GENERATED, cache_dir=str(tmp_path), seed=1)
    built = build_splits(settings)
    assert {name: len(records) for name, records in built.splits.items()} == {
        "train": 32,
        "val": 8,
        "test": 8,
    }
    assert built.caption_clusters is None
