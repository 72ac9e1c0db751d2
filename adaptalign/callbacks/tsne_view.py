"""The ``TSNEView`` callback: a t-SNE view of validation images and captions every few epochs."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor

from adaptalign.common.errors import ConfigurationError
from adaptalign.common.tsne import (
    TSNECoordinates,
    check_settings,
    clean_text,
    first_caption_clusters,
    plot_coordinates,
    primary_objects,
    tsne_coordinates,
)

log = logging.getLogger(__name__)


class TSNEView(L.Callback):
    """Draws a joint t-SNE of validation images and captions every few epochs.

    The first ``max_points`` validation images of global rank 0 (of the first validation loader)
    are shown with all their captions, as ``validation_step`` embedded them (its outputs'
    ``image_embeddings`` and ``text_embeddings``): the towers run once. At the epoch's end the
    view is written to ``<log dir>/tsne/tsne_epoch{E:03d}.png`` and, when the logger's
    ``experiment`` can, logged as the image ``val/tsne`` and (``projector``) as TensorBoard
    projector embeddings with columns modality, cluster and text. Nothing happens while Lightning
    sanity-checks, nor on epochs ``E`` where ``E + 1`` is not a multiple of ``every_n_epochs``, nor
    when the trainer has no log directory. The t-SNE fit runs on the CPU of rank 0.

    Args:
        every_n_epochs: draw after epochs 0-based ``E`` with ``(E + 1) % every_n_epochs == 0``.
        max_points: images per view (each with all its captions).
        perplexity: t-SNE perplexity, clamped to what the number of points allows.
        projector: also write TensorBoard projector embeddings.
        seed: t-SNE random state.
        max_iter: t-SNE optimisation iterations (at least 250).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_points: int = 1000,
        perplexity: float = 30.0,
        projector: bool = True,
        seed: int = 0,
        max_iter: int = 1000,
    ) -> None:
        if (
            isinstance(every_n_epochs, bool)
            or not isinstance(every_n_epochs, int)
            or every_n_epochs < 1
        ):
            raise ConfigurationError(f"every_n_epochs={every_n_epochs!r}; expected an integer >= 1")
        check_settings(max_points, perplexity, max_iter)
        self.every_n_epochs = every_n_epochs
        self.max_points = max_points
        self.perplexity = float(perplexity)
        self.projector = projector
        self.seed = seed
        self.max_iter = max_iter
        self.last_path: Path | None = None
        self.last_coordinates: TSNECoordinates | None = None
        self._collecting = False
        self._reset()

    def _reset(self) -> None:
        self._images: list[Tensor] = []
        self._image_ids: list[Tensor] = []
        self._texts: list[Tensor] = []
        self._text_image_ids: list[Tensor] = []
        self._captions: list[str] = []
        self._clusters: list[Tensor] | None = []
        self._count = 0

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self._collecting = self._due(trainer) and trainer.is_global_zero

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: object,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._collecting or dataloader_idx != 0 or self._count >= self.max_points:
            return
        images, texts = step_embeddings(outputs)
        room = self.max_points - self._count
        image_ids = batch["image_id"][:room].detach().cpu()
        owners = batch["text_image_id"].detach().cpu()
        keep = torch.isin(owners, image_ids)
        self._images.append(images[:room].detach().float().cpu())
        self._image_ids.append(image_ids)
        self._texts.append(texts.detach().float().cpu()[keep])
        self._text_image_ids.append(owners[keep])
        self._captions.extend(t for t, k in zip(batch["texts"], keep.tolist(), strict=True) if k)
        clusters = batch.get("text_cluster")
        if clusters is None or self._clusters is None:
            self._clusters = None
        else:
            self._clusters.append(torch.as_tensor(clusters).detach().cpu()[keep])
        self._count += image_ids.numel()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        log_dir = trainer.log_dir  # a collective call: every rank must make it
        collected = self._count
        if not trainer.is_global_zero or log_dir is None or collected == 0:
            self._reset()
            return
        images = torch.cat(self._images)
        image_ids = torch.cat(self._image_ids)
        texts = torch.cat(self._texts)
        text_image_ids = torch.cat(self._text_image_ids)
        clusters = None if self._clusters is None else torch.cat(self._clusters)
        captions = self._captions
        self._reset()
        if images.shape[0] + texts.shape[0] < 2:
            log.info("t-SNE view skipped: fewer than 2 validation points")
            return
        row_of = {int(i): row for row, i in enumerate(image_ids.tolist())}
        owner = torch.tensor([row_of[int(i)] for i in text_image_ids.tolist()], dtype=torch.long)
        epoch = trainer.current_epoch
        coordinates = tsne_coordinates(
            images, texts, owner, self.seed, self.max_points, self.perplexity, self.max_iter
        )
        path = Path(log_dir) / "tsne" / f"tsne_epoch{epoch:03d}.png"
        records = getattr(getattr(trainer, "datamodule", None), "records", None)
        objects = primary_objects(records, image_ids.tolist())
        plot_coordinates(coordinates, path, clusters, image_ids, image_objects=objects)
        self.last_path, self.last_coordinates = path, coordinates
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger else None
        add_image = getattr(experiment, "add_image", None)
        if callable(add_image):
            from PIL import Image

            with Image.open(path) as picture:
                pixels = np.asarray(picture.convert("RGB"))
            add_image("val/tsne", pixels, global_step=trainer.global_step, dataformats="HWC")
        add_embedding = getattr(experiment, "add_embedding", None)
        if self.projector and callable(add_embedding):
            metadata = projector_metadata(image_ids, owner, captions, clusters)
            add_embedding(
                torch.cat([images, texts]),
                metadata=metadata,
                metadata_header=["modality", "cluster", "text"],
                tag="val_embeddings",
                global_step=epoch,
            )


def projector_metadata(
    image_ids: Tensor, text_image: Tensor, captions: Sequence[str], clusters: Tensor | None
) -> list[list[str]]:
    """Rows (images first, then captions) of modality, cluster and text for the projector.

    An image's text is ``image <id>`` and its cluster its first caption's; without clusters the
    column says ``none``. Tabs and newlines in captions become spaces.
    """
    if clusters is None:
        image_clusters = ["none"] * image_ids.numel()
        text_clusters = ["none"] * len(captions)
    else:
        labels = clusters.long().numpy()
        firsts = first_caption_clusters(text_image.numpy(), labels, image_ids.numel())
        image_clusters = [str(v) if v >= 0 else "none" for v in firsts.tolist()]
        text_clusters = [str(v) for v in labels.tolist()]
    rows = [
        ["image", cluster, f"image {i}"]
        for i, cluster in zip(image_ids.tolist(), image_clusters, strict=True)
    ]
    rows += [
        ["text", cluster, clean_text(caption) or "(empty)"]
        for caption, cluster in zip(captions, text_clusters, strict=True)
    ]
    return rows


def step_embeddings(outputs: object) -> tuple[Tensor, Tensor]:
    """The image and text embeddings a validation step returned, or a clear error."""
    found = outputs if isinstance(outputs, Mapping) else {}
    images, texts = found.get("image_embeddings"), found.get("text_embeddings")
    if not isinstance(images, Tensor) or not isinstance(texts, Tensor):
        raise ConfigurationError(
            "TSNEView needs the validation step's embeddings: validation_step must return "
            "{'image_embeddings': ..., 'text_embeddings': ...} as AlignmentModule does"
        )
    return images, texts
