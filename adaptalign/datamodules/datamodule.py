"""The data module: where records come from, how they are split, batched and preprocessed.

Real data and the built-in generated data go through the same Karpathy-JSON reader. Image
preprocessing comes from the system being trained (its image tower's timm data config) when one is
attached, so data and model can never disagree about input size or normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from adaptalign.datamodules.datasets import (
    EvalImages,
    PairSampler,
    TrainPairs,
    Transform,
    collate_eval,
    collate_pairs,
    default_transform,
)
from adaptalign.datamodules.generated import GeneratedConfig, generate_dataset
from adaptalign.datamodules.karpathy import read_karpathy
from adaptalign.datamodules.records import DatasetFormatError, Record
from adaptalign.errors import ConfigurationError

Split = Literal["train", "val", "test"]


class AlignmentDataModule(L.LightningDataModule):
    """Image-caption data for alignment.

    Args:
        annotations: a Karpathy split JSON; ``None`` uses the built-in generated dataset.
        image_root: folder the JSON's file names are relative to (default: the JSON's folder).
        generated: settings of the generated dataset (used when ``annotations`` is ``None``).
        cache_dir: where generated data is written once (default ``$ADAPTALIGN_CACHE`` or
            ``~/.cache/adaptalign``).
        batch_size: training pairs per batch on each process; ``eval_batch_size``: images per
            evaluation batch (each with all its captions).
        predict_split: the split ``predict`` embeds.
        seed: drives shuffling and the per-epoch caption choice.
    """

    def __init__(
        self,
        annotations: str | None = None,
        image_root: str | None = None,
        generated: GeneratedConfig | None = None,
        cache_dir: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        predict_split: Split = "test",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 2:
            raise ConfigurationError(
                f"data.batch_size={batch_size}; expected >= 2 (a contrastive batch needs negatives)"
            )
        self.annotations = annotations
        self.image_root = image_root
        self.generated = generated or GeneratedConfig()
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.predict_split = predict_split
        self.seed = seed
        self.splits: dict[str, list[Record]] = {}

    def annotation_path(self) -> Path:
        if self.annotations is None:
            return generate_dataset(self.generated, self.cache_dir)
        path = Path(self.annotations).expanduser()
        if not path.is_file():
            raise ConfigurationError(f"data.annotations={self.annotations!r} does not exist")
        return path

    def prepare_data(self) -> None:
        self.annotation_path()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        records = read_karpathy(self.annotation_path(), self.image_root)
        self.splits = {
            name: [r for r in records if r.split == name] for name in ("train", "val", "test")
        }
        missing = [r.image_path for r in records if not r.image_path.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:5])
            raise DatasetFormatError(
                f"{len(missing)} of {len(records)} image files listed in {self.annotation_path()} "
                f"are missing, e.g. {shown}"
            )

    def _records(self, split: str) -> list[Record]:
        records = self.splits.get(split, [])
        if not records:
            raise DatasetFormatError(f"split {split!r} of {self.annotation_path()} has no images")
        return records

    def image_transform(self, training: bool) -> Transform:
        module = self.trainer.lightning_module if self.trainer is not None else None
        make = getattr(module, "image_transform", None)
        return make(training) if callable(make) else default_transform()

    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        records = self._records("train")
        rank, world = self._world()
        if len(records) < self.batch_size * world:
            raise ConfigurationError(
                f"the train split has {len(records)} images, fewer than one global batch "
                f"(data.batch_size={self.batch_size} x {world} processes)"
            )
        dataset = TrainPairs(records, self.image_transform(training=False), seed=self.seed)
        sampler = PairSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=collate_pairs,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = EvalImages(self._records(split), self.image_transform(training=False))
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_eval,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_split)
