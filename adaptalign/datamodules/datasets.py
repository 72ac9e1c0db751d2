"""Torch datasets over :class:`Record` lists: training pairs and evaluation images with captions.

Training sees one caption per image per epoch, drawn from (seed, epoch, image), so two captions of
one image never meet in a batch as false negatives and every caption is used over the epochs.
Evaluation sees each image once with all its captions (Karpathy protocol). When a tower is frozen,
its cached features stand in for the raw input (``image_features`` / ``text_features``).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler
from torchvision.transforms import v2

from adaptalign.common.errors import DatasetFormatError
from adaptalign.datamodules.records import Record

if TYPE_CHECKING:
    from adaptalign.datamodules.frozen_features import FrozenFeatures
    from adaptalign.datamodules.noise import NoiseConfig

Transform = Callable[[Image.Image], Tensor]


@dataclass
class CaptionClusters:
    """Each training caption's long-tail cluster, and each cluster's size in the training data."""

    labels: dict[int, np.ndarray]  # image id -> cluster label of each of its captions
    sizes: np.ndarray  # cluster label -> number of training captions in it
    # Evaluation captions, given their nearest cluster: image id -> label / size bucket per caption
    # (0 tail, 1 middle, 2 head by the tercile of the cluster's training size).
    eval_labels: dict[int, np.ndarray] = field(default_factory=dict)
    eval_buckets: dict[int, np.ndarray] = field(default_factory=dict)
    # Each cluster's unit-length centre: a split's captions join their nearest cluster only when
    # its loader is first built, so the report split is not read before selection is final.
    centres: Tensor | None = None


def image_bucket(caption_buckets: np.ndarray) -> int:
    """An image's bucket for image->text queries: the one most of its captions fall in.

    A tie goes to the rarer bucket, so an image described as often by tail as by head concepts
    counts towards the tail, which is the part a long-tail method claims to help.
    """
    counts = np.bincount(np.asarray(caption_buckets, dtype=np.int64), minlength=3)
    return int(np.argmax(counts))  # argmax returns the first (lowest) of equal counts


def default_transform() -> Transform:
    """Used when no image tower supplied its own preprocessing (a data module on its own)."""
    return v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    )


# Without ``verify_images`` a broken file is found only when a batch first needs it, possibly hours
# in; the message says how to find them all up front, and how to leave them out.
UNDECODABLE_HINT = (
    "expected a complete, readable image; data.verify_images: true checks every image before "
    "training and reports all broken ones, data.skip_bad_images: true then leaves them out"
)


def load_image(path: Path) -> Image.Image:
    """Decode an image fully, naming the file if it is missing or unreadable."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as exc:
        raise DatasetFormatError(f"{path}: image file not found") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetFormatError(
            f"{path}: cannot decode image ({exc}); {UNDECODABLE_HINT}"
        ) from exc


# A shard's images are only seen as they stream, so the hint is about skipping, not checking.
UNDECODABLE_SAMPLE_HINT = (
    "expected a complete, readable image; data.skip_bad_images: true counts and skips such samples"
)


def decode_image(data: bytes, source: str) -> Image.Image:
    """Decode an image held in memory (a shard's member), naming ``source`` if it cannot be."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetFormatError(
            f"{source}: cannot decode image ({exc}); {UNDECODABLE_SAMPLE_HINT}"
        ) from exc


def load_record_image(
    record: Record, noise: NoiseConfig | None = None, data: bytes | None = None
) -> Image.Image:
    """The record's image, with the noise config's image noise keyed by its image id.

    ``data``: the image's bytes when they were read already (a pair streamed from a shard).
    """
    if data is not None:
        image = decode_image(data, str(record.image_path))
    elif record.shard:
        raise DatasetFormatError(
            f"{record.image_path}: a pair stored in a WebDataset shard; its image is read by "
            "streaming the shard, not by path"
        )
    else:
        image = load_image(record.image_path)
    if noise is not None and noise.image_rate > 0:
        image = noise.image(image, record.image_id)
    return image


def _image_input(
    record: Record,
    transform: Transform,
    features: FrozenFeatures | None,
    noise: NoiseConfig | None,
    data: bytes | None = None,
) -> dict[str, Tensor]:
    if features is not None and features.image is not None:
        return {"image_features": features.image[record.image_id]}
    return {"images": transform(load_record_image(record, noise, data))}


class TrainPairs(Dataset):
    """One (image, caption) pair per image; the caption is chosen by ``(seed, epoch, index)``."""

    def __init__(
        self,
        records: Sequence[Record],
        transform: Transform,
        seed: int = 0,
        features: FrozenFeatures | None = None,
        clusters: CaptionClusters | None = None,
        image_noise: NoiseConfig | None = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.seed = seed
        self.features = features
        self.clusters = clusters
        self.image_noise = image_noise

    def __len__(self) -> int:
        return len(self.records)

    def caption_index(self, index: int, epoch: int) -> int:
        count = len(self.records[index].captions)
        return int(np.random.default_rng([self.seed, epoch, index]).integers(count))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        record = self.records[index]
        return self.pair(
            index, epoch, _image_input(record, self.transform, self.features, self.image_noise)
        )

    def streamed(self, index: int, epoch: int, image: bytes | Tensor) -> dict:
        """The pair of ``index`` in ``epoch`` whose image came with a stream: the image's bytes
        (decoded, noised and transformed here) or its frozen features read from the cache."""
        if isinstance(image, Tensor):
            return self.pair(index, epoch, {"image_features": image})
        record = self.records[index]
        return self.pair(
            index, epoch, _image_input(record, self.transform, None, self.image_noise, image)
        )

    def pair(self, index: int, epoch: int, image: dict[str, Tensor]) -> dict:
        """The training item of ``index`` in ``epoch`` around its image input (pixels or
        features): the epoch's caption, its cached features and its cluster."""
        record = self.records[index]
        caption = self.caption_index(index, epoch)
        item = {
            **image,
            "texts": record.captions[caption],
            "index": index,
            "image_id": record.image_id,
            "caption_index": caption,
            "objects": record.objects,
        }
        if self.features is not None and self.features.text is not None:
            item["text_features"] = self.features.text[record.image_id][caption]
        if self.clusters is not None:
            label = int(self.clusters.labels[record.image_id][caption])
            item["cluster"] = label
            item["cluster_size"] = int(self.clusters.sizes[label])
        return item


def text_features(rows: list[Tensor]) -> dict[str, Tensor]:
    """A batch's cached caption rows: ``text_features`` ``(B, D)``; for a text prefix's ragged
    ``(tokens, H)`` rows, padded with zeros to ``(B, T, H)`` beside ``text_features_mask``."""
    if rows[0].dim() == 1:
        return {"text_features": torch.stack(rows)}
    longest = max(row.shape[0] for row in rows)
    padded = rows[0].new_zeros((len(rows), longest, rows[0].shape[1]))
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    return {"text_features": padded, "text_features_mask": mask}


def collate_pairs(items: list[dict]) -> dict:
    batch = {
        "texts": [it["texts"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
        "image_id": torch.tensor([it["image_id"] for it in items]),
        "caption_index": torch.tensor([it["caption_index"] for it in items]),
        "objects": [it["objects"] for it in items],
    }
    for key in ("images", "image_features"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    if "text_features" in items[0]:
        batch.update(text_features([it["text_features"] for it in items]))
    for key in ("cluster", "cluster_size"):
        if key in items[0]:
            batch[key] = torch.tensor([it[key] for it in items])
    return batch


class PairSampler(DistributedSampler):
    """Shuffles (and shards, under DDP) images and tells the dataset the epoch of each draw.

    Being a ``DistributedSampler``, Lightning neither replaces it nor forgets its ``set_epoch``.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        for index in super().__iter__():
            yield index, self.epoch


class EvalImages(Dataset):
    """Each image once with all its captions; caption ids are global positions in the split."""

    def __init__(
        self,
        records: Sequence[Record],
        transform: Transform,
        features: FrozenFeatures | None = None,
        clusters: CaptionClusters | None = None,
        image_noise: NoiseConfig | None = None,
        image_bytes: Mapping[int, bytes] | None = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.features = features
        self.image_noise = image_noise
        # Images of pairs stored in shards, read from them once, by image id.
        self.image_bytes = image_bytes or {}
        self.clusters = clusters if clusters is not None and clusters.eval_buckets else None
        counts = [len(r.captions) for r in self.records]
        self.first_caption = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        start = self.first_caption[index]
        data = self.image_bytes.get(record.image_id)
        item = {
            **_image_input(record, self.transform, self.features, self.image_noise, data),
            "image_id": record.image_id,
            "texts": list(record.captions),
            "text_id": list(range(start, start + len(record.captions))),
        }
        if self.features is not None and self.features.text is not None:
            item["text_features"] = self.features.text[record.image_id][: len(record.captions)]
        if self.clusters is not None:
            buckets = self.clusters.eval_buckets[record.image_id]
            item["text_cluster"] = self.clusters.eval_labels[record.image_id].tolist()
            item["text_bucket"] = buckets.tolist()
            item["image_bucket"] = image_bucket(buckets)
        return item


def collate_eval(items: list[dict]) -> dict:
    batch = {
        "image_id": torch.tensor([it["image_id"] for it in items]),
        "texts": [t for it in items for t in it["texts"]],
        "text_id": torch.tensor([i for it in items for i in it["text_id"]]),
        "text_image_id": torch.tensor(
            [it["image_id"] for it in items for _ in it["texts"]], dtype=torch.long
        ),
    }
    if "images" in items[0]:
        batch["images"] = torch.stack([it["images"] for it in items])
    else:
        batch["image_features"] = torch.stack([it["image_features"] for it in items])
    if "text_features" in items[0]:
        batch.update(text_features([row for it in items for row in it["text_features"]]))
    if "text_bucket" in items[0]:
        batch["image_bucket"] = torch.tensor([it["image_bucket"] for it in items])
        for key in ("text_bucket", "text_cluster"):
            batch[key] = torch.tensor([v for it in items for v in it[key]], dtype=torch.long)
    return batch
