"""Features of frozen towers for every image and caption of a dataset, through the feature cache.

A frozen backbone with deterministic preprocessing maps an input to the same features in every
epoch, run and method, so they are computed once for the whole annotation file (all splits: any
subset, seed or method then reuses them) and training reads them instead of decoding images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from adaptalign.datamodules.datasets import Transform, load_record_image
from adaptalign.datamodules.feature_cache import (
    FeatureCache,
    digest,
    file_digest,
    module_digest,
    text_digest,
)
from adaptalign.datamodules.noise import NoiseConfig
from adaptalign.datamodules.records import Record
from adaptalign.lightning_modules.towers import encode_by_length


@dataclass
class FrozenFeatures:
    """Per image id: its image features ``(D,)`` and its captions' features ``(n, D)``."""

    image: dict[int, Tensor] | None = None
    text: dict[int, Tensor] | None = None


class _Images(Dataset):
    def __init__(
        self, records: Sequence[Record], transform: Transform, noise: NoiseConfig | None
    ) -> None:
        self.records, self.transform, self.noise = records, transform, noise

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Tensor:
        return self.transform(load_record_image(self.records[index], self.noise))


def _device(tower: nn.Module) -> torch.device:
    return next(tower.parameters()).device


@torch.no_grad()
def encode_images(
    tower: nn.Module,
    records: Sequence[Record],
    transform: Transform,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    noise: NoiseConfig | None = None,
) -> Tensor:
    loader = DataLoader(
        _Images(records, transform, noise), batch_size=batch_size, num_workers=num_workers
    )
    device = _device(tower)
    out = []
    for images in tqdm(loader, desc="image features", unit="batch", disable=not progress):
        out.append(tower.features(images.to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_texts(
    tower: nn.Module, captions: Sequence[str], batch_size: int = 256, progress: bool = True
) -> Tensor:
    # ``encode`` bypasses the tower's in-memory memo: the cache entry is the one stored copy.
    encode = getattr(tower, "encode", tower.features)
    return encode_by_length(
        captions,
        batch_size,
        lambda batch: encode(batch).float().cpu(),
        lambda starts: tqdm(starts, desc="text features", unit="batch", disable=not progress),
    )


def compute_frozen_features(
    module: nn.Module,
    records: Sequence[Record],
    cache: FeatureCache,
    transform: Transform,
    num_workers: int = 0,
    progress: bool = True,
    barrier: Callable[[], None] = lambda: None,
    is_writer: bool = True,
    image_noise: NoiseConfig | None = None,
) -> FrozenFeatures:
    """Cached features of the module's frozen towers; towers that train are left alone.

    Under several processes the writer computes and stores while the others wait at ``barrier``,
    then everyone reads the same entry. ``image_noise`` perturbs the images first (its settings
    join the key); caption noise is already in the records' text, which is the key.
    """
    if image_noise is not None and image_noise.image_rate == 0:
        image_noise = None
    result = FrozenFeatures()
    image_tower = getattr(module, "image_tower", None)
    text_tower = getattr(module, "text_tower", None)
    if image_tower is not None and getattr(image_tower, "frozen", False):
        model_key = module_digest(image_tower.backbone, repr(transform))
        data_key = file_digest([r.image_path for r in records], progress=progress)
        if image_noise is not None:
            data_key = digest([data_key.encode(), repr(image_noise).encode()])

        def images() -> Tensor:
            return encode_images(
                image_tower,
                records,
                transform,
                num_workers=num_workers,
                progress=progress,
                noise=image_noise,
            )

        features = _shared(
            cache, "image", model_key, data_key, len(records), images, barrier, is_writer
        )
        result.image = {r.image_id: features[i] for i, r in enumerate(records)}
    if text_tower is not None and getattr(text_tower, "frozen", False):
        captions = [c for r in records for c in r.captions]
        model_key = module_digest(text_tower.backbone, str(text_tower.config.max_length))
        data_key = text_digest(captions)

        def texts() -> Tensor:
            return encode_texts(text_tower, captions, progress=progress)

        features = _shared(
            cache, "text", model_key, data_key, len(captions), texts, barrier, is_writer
        )
        result.text, start = {}, 0
        for r in records:
            result.text[r.image_id] = features[start : start + len(r.captions)]
            start += len(r.captions)
    return result


def _shared(
    cache: FeatureCache,
    kind: str,
    model_key: str,
    data_key: str,
    rows: int,
    compute: Callable[[], Tensor],
    barrier: Callable[[], None],
    is_writer: bool,
) -> Tensor:
    if is_writer:
        features = cache.get_or_compute(kind, model_key, data_key, rows, compute)
        barrier()
        return features
    barrier()
    return cache.get_or_compute(kind, model_key, data_key, rows, compute)
