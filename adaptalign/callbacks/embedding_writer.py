"""Writes the embeddings ``predict`` computes to a file per split, for analysis outside training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from adaptalign.common.atomic_files import atomic_open
from adaptalign.common.tsne import primary_objects


class EmbeddingWriter(BasePredictionWriter):
    """Saves image and text embeddings with their ids and captions as a ``torch.save`` dict.

    Args:
        output_path: the file to write; default ``<log dir>/predictions/embeddings_<split>.pt``.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_path = output_path
        self.written: Path | None = None

    def _target(self, trainer: L.Trainer) -> Path:
        if self.output_path is not None:
            return Path(self.output_path)
        split = getattr(trainer.datamodule, "predict_split", "predict")
        root = Path(trainer.log_dir or trainer.default_root_dir)
        return root / "predictions" / f"embeddings_{split}.pt"

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        batches = [b for loader in _per_loader(predictions) for b in loader]
        if not batches:
            return
        result = {
            key: torch.cat([b[key] for b in batches])
            for key in (
                "image_embeddings",
                "image_id",
                "text_embeddings",
                "text_id",
                "text_image_id",
            )
        }
        result["texts"] = [t for b in batches for t in b["texts"]]
        if all("text_cluster" in b for b in batches):  # with caption clusters: t-SNE colours
            result["text_cluster"] = torch.cat([b["text_cluster"] for b in batches])
        records = getattr(trainer.datamodule, "records", None)
        objects = primary_objects(records, result["image_id"].tolist())
        if any(objects):  # data that knows its images' objects: t-SNE colours by the true object
            result["image_objects"] = objects
        if trainer.world_size > 1:
            path = self._target(trainer)
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        else:
            path = self._target(trainer)
        with atomic_open(path) as file:
            torch.save(result, file)
        self.written = path
        print(
            f"wrote {result['image_embeddings'].shape[0]} image and "
            f"{result['text_embeddings'].shape[0]} text embeddings to {path}"
        )


def _per_loader(predictions: list) -> list[list]:
    """Lightning nests predictions per dataloader only when there are several."""
    if predictions and isinstance(predictions[0], list):
        return predictions
    return [predictions]
