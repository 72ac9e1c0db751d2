"""Features of frozen towers for the images and captions a run uses, through the feature cache.

A frozen backbone with deterministic preprocessing maps an input to the same features in every
epoch, run and method, so each image and caption is encoded once and stored per item; training
reads features instead of decoding images. A run extracts only what it uses (its training subset
and the splits it evaluates); a later run that needs more adds just the missing items.

Encoding is canonical, so an item's features do not depend on which run extracted it or on what
else was in its batch. On CPU a forward pass's output rows change in their last bits with the
batch's size and padding (all-MiniLM-L6-v2: up to 2e-7 between a caption encoded alone, in a
batch of 32 or padded among longer captions; tf_efficientnet_lite0: 5e-7 between batches of 1 and
32), and results reproduce to the digit only on identical features. So every forward pass has
exactly ``IMAGE_BATCH`` or ``TEXT_BATCH`` rows (a short batch is filled up with copies of its last
item) and a batch of captions holds one token length only, so nothing is padded.

A tower whose top blocks train has a frozen prefix instead: its output (the image feature map, the
caption's hidden states entering the first trained layer) is cached the same way, in float16 (half
the disk and memory; the loss and gradients stay within the tolerance ``tests/test_prefix_cache``
states), and each training step runs only the trained top.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from adaptalign.common.progress import Bar, progress_bar, say
from adaptalign.datamodules.datasets import Transform, load_record_image
from adaptalign.datamodules.feature_cache import (
    FeatureCache,
    Ragged,
    check_space,
    digest,
    first_positions,
    module_digest,
    size_text,
    state_digest,
)
from adaptalign.datamodules.model_inputs import FeatureTower, ModelInputs, TextPrefix
from adaptalign.datamodules.noise import NoiseConfig
from adaptalign.datamodules.records import Record
from adaptalign.encoders.length_sorted import length_batches, token_lengths
from adaptalign.encoders.text_models import sentence_width

if TYPE_CHECKING:
    from adaptalign.datamodules.shard_features import ShardFeatures

# Rows per forward pass (part of the model key, since they shape the last bits of every row).
IMAGE_BATCH = 64
TEXT_BATCH = 32
# Items per stored chunk: what a killed extraction loses at most. On 2 CPU cores a chunk is about
# 17 s of tf_efficientnet_lite0 (30 images/s) or 14 s of MiniLM (150 captions/s).
IMAGE_CHUNK = 512
TEXT_CHUNK = 2048

Shared = TypeVar("Shared")

# What a frozen prefix's rows are stored in (part of the model key).
PREFIX_STORAGE = "float16"

Batches = Iterable[tuple[list[int], Tensor | Ragged]]


@dataclass
class FrozenFeatures:
    """Per image id: its image features ``(D,)`` (or prefix map) and its captions' features
    ``(n, D)`` (or, for a text prefix, one ``(tokens, H)`` tensor per caption)."""

    image: dict[int, Tensor] | None = None
    text: dict[int, Tensor | Ragged] | None = None
    # Images stored in shards: their features, read back shard by shard (a stream reads them).
    shard_images: ShardFeatures | None = None


class _Images(Dataset):
    def __init__(
        self, records: Sequence[Record], transform: Transform, noise: NoiseConfig | None
    ) -> None:
        self.records, self.transform, self.noise = records, transform, noise

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Tensor:
        return self.transform(load_record_image(self.records[index], self.noise))


def full_batch(rows: Tensor, size: int) -> Tensor:
    """``rows`` filled up to ``size`` with copies of the last one (a short batch's forward pass
    then computes its rows exactly as a full one would)."""
    missing = size - rows.shape[0]
    if missing <= 0:
        return rows
    return torch.cat([rows, rows[-1:].expand(missing, *rows.shape[1:])])


def image_model_key(tower: FeatureTower, transform: Transform) -> str:
    """The frozen part's weights, where it stops, the preprocessing and the batching."""
    settings = [repr(transform), f"batch={IMAGE_BATCH}"]
    if tower.cut:
        settings += [f"prefix below {tower.cut}", PREFIX_STORAGE]
    return state_digest(tower.frozen_state(), *settings)


def text_prefix_key(prefix: TextPrefix) -> str:
    model = prefix.model
    return state_digest(
        prefix.frozen_state(),
        f"prefix below {prefix.cut}",
        f"max_length={model.max_seq_length}",
        f"batch={TEXT_BATCH}",
        PREFIX_STORAGE,
    )


def text_model_key(backbone: nn.Module) -> str:
    """The same for the frozen text tower and the caption clusters when the model is the same."""
    return module_digest(backbone, f"max_length={backbone.max_seq_length}", f"batch={TEXT_BATCH}")


def active_image_noise(noise: NoiseConfig | None) -> NoiseConfig | None:
    """The noise config when it perturbs images, else ``None`` (clean images are keyed by their
    bytes alone)."""
    return noise if noise is not None and noise.image_rate > 0 else None


def image_key(record: Record, noise: NoiseConfig | None) -> str:
    """The image's bytes; noisy images add the noise settings and the image id they are keyed by."""
    return image_bytes_key(record.image_path.read_bytes(), noise, record.image_id)


def image_bytes_key(data: bytes, noise: NoiseConfig | None, image_id: int | None = None) -> str:
    """:func:`image_key` of an image's bytes, however they were read (a file, a shard's member):
    the same image stored either way has one key, so its features are computed once. Noisy
    images need their ``image_id``."""
    parts = [data]
    if noise is not None:
        parts += [repr(noise).encode(), str(image_id).encode()]
    return digest(parts)


def caption_key(caption: str) -> str:
    return digest([caption.encode()])


def encode_images(
    tower: FeatureTower,
    records: Sequence[Record],
    transform: Transform,
    num_workers: int = 0,
    noise: NoiseConfig | None = None,
) -> Batches:
    """``(positions in records, features)`` batches of the tower's backbone features."""
    # A generator of its own: drawing the loader's seed from the global one would make a run
    # that fills the cache draw differently afterwards (dropout, ...) from one that reads it.
    loader = DataLoader(
        _Images(records, transform, noise),
        batch_size=IMAGE_BATCH,
        num_workers=num_workers,
        generator=torch.Generator(),
    )
    device = tower_device(tower)
    start = 0
    for images in loader:
        count = images.shape[0]
        yield list(range(start, start + count)), forward_images(tower, images, device)
        start += count


def tower_device(tower: FeatureTower) -> torch.device:
    """Where the frozen part's weights are, so its input batches go there."""
    return next(iter(tower.frozen_state().values())).device


def forward_images(tower: FeatureTower, images: Tensor, device: torch.device) -> Tensor:
    """The frozen part's rows of at most ``IMAGE_BATCH`` preprocessed images, from one forward
    pass of exactly ``IMAGE_BATCH`` rows: what makes every image's row canonical."""
    count = images.shape[0]
    if count > IMAGE_BATCH:
        raise ValueError(f"{count} images for one forward pass of {IMAGE_BATCH}")
    with torch.no_grad():
        rows = tower.frozen_features(full_batch(images, IMAGE_BATCH).to(device))[:count]
    return rows.float().cpu()


def encode_texts(backbone: nn.Module, captions: Sequence[str]) -> Batches:
    """``(positions in captions, sentence embeddings)`` batches, unpadded and of full size."""
    lengths = token_lengths(backbone, captions)
    for batch in length_batches(captions, lengths, TEXT_BATCH):
        texts = [captions[i] for i in batch]
        texts += texts[-1:] * (TEXT_BATCH - len(texts))
        rows = backbone.encode(
            texts, batch_size=TEXT_BATCH, show_progress_bar=False, convert_to_tensor=True
        )
        # A clone outside the encoder's inference mode can take part in training.
        yield batch, rows[: len(batch)].float().cpu().clone()


def encode_text_prefixes(
    prefix: TextPrefix, captions: Sequence[str], lengths: Sequence[int] | None = None
) -> Batches:
    """``(positions, one (tokens, H) tensor per caption)`` batches of the frozen prefix's hidden
    states; each forward holds one token length, so nothing is padded. ``lengths``: the
    captions' token counts, when already known."""
    if lengths is None:
        lengths = token_lengths(prefix.model, captions)
    for batch in length_batches(captions, lengths, TEXT_BATCH):
        texts = [captions[i] for i in batch]
        texts += texts[-1:] * (TEXT_BATCH - len(texts))
        with torch.no_grad():
            hidden, _ = prefix.frozen_hidden(texts)
        yield batch, [row.float().cpu() for row in hidden[: len(batch)]]


@dataclass(frozen=True)
class Storage:
    """What the cache is about to hold, so its size is said (and checked) before filling it."""

    desc: str  # e.g. "image prefix below blocks.6"
    unit: str  # "image" or "caption"
    row_bytes: Callable[[int], int]  # bytes of the item at a position
    setting: str  # the setting that decides the size, for the refusal

    def reporter(self, enabled: bool, folder: Path) -> Callable[[list[int], int], Bar]:
        def report(missing: list[int], wanted: int) -> Bar:
            needed = sum(self.row_bytes(i) for i in missing)
            what = f"{self.desc} for {len(missing)} {self.unit}s"
            check_space(folder, needed, what, self.setting)
            if enabled:
                cached = f"{wanted - len(missing)} cached, " if len(missing) < wanted else ""
                say(
                    f"{self.desc}: {len(missing)} of {wanted} {self.unit}s to compute, "
                    f"{size_text(needed)} ({cached}stored in {folder}, chunk by chunk: an "
                    "interrupted run resumes where it stopped)"
                )
            return progress_bar(len(missing), self.desc, self.unit, enabled)

        return report


def _remap(positions: list[int], batches: Batches) -> Batches:
    """Batches over a selection, with positions given in the full list instead."""
    for local, rows in batches:
        yield [positions[i] for i in local], rows


def image_storage(tower: FeatureTower) -> Storage:
    """What one image takes in the cache: its features, or in float16 its frozen prefix's map."""
    half = bool(tower.cut)
    row = math.prod(tower.cached_shape) * (2 if half else 4)
    return Storage(
        f"image prefix below {tower.cut}" if half else "image features",
        "image",
        lambda _: row,
        "model.image_tower.unlocked_blocks",
    )


def image_features(
    tower: FeatureTower,
    records: Sequence[Record],
    transform: Transform,
    cache: FeatureCache,
    num_workers: int = 0,
    noise: NoiseConfig | None = None,
    progress: bool = True,
) -> Tensor:
    """One row of the tower's frozen part per record, computing only what is not cached."""
    key = image_model_key(tower, transform)

    def compute(positions: list[int]) -> Batches:
        todo = [records[i] for i in positions]
        return _remap(positions, encode_images(tower, todo, transform, num_workers, noise))

    keys = [image_key(r, noise) for r in records]
    report = image_storage(tower).reporter(progress, cache.folder("image", key))
    features = cache.rows("image", key, keys, compute, IMAGE_CHUNK, report, half=bool(tower.cut))
    assert isinstance(features, Tensor)
    return features


def caption_features(
    backbone: nn.Module,
    captions: Sequence[str],
    cache: FeatureCache | None,
    progress: bool = True,
    desc: str = "text features",
) -> Tensor:
    """One row of sentence embeddings per caption, computing only what is not cached.

    Frozen text towers and caption clusters both come here, so a model they share encodes each
    caption once. Without a cache everything is computed, the same way.
    """
    captions = list(captions)

    def compute(positions: list[int]) -> Batches:
        return _remap(positions, encode_texts(backbone, [captions[i] for i in positions]))

    if cache is None:
        return _uncached(captions, compute)
    key = text_model_key(backbone)
    row = sentence_width(backbone) * 4
    storage = Storage(desc, "caption", lambda _: row, "model.text_tower.unlocked_layers")
    report = storage.reporter(progress, cache.folder("text", key))
    keys = [caption_key(c) for c in captions]
    features = cache.rows("text", key, keys, compute, TEXT_CHUNK, report)
    assert isinstance(features, Tensor)
    return features


def caption_prefixes(
    prefix: TextPrefix, captions: Sequence[str], cache: FeatureCache, progress: bool = True
) -> Ragged:
    """Each caption's hidden states entering the first trained layer, ``(tokens, H)``, computing
    only what is not cached."""
    captions = list(captions)
    lengths: list[int] = []

    def token_counts() -> list[int]:
        """Tokenised once, and only when something is missing (the size check, then batching)."""
        if not lengths:
            lengths.extend(token_lengths(prefix.model, captions))
        return lengths

    def compute(positions: list[int]) -> Batches:
        todo = [captions[i] for i in positions]
        counts = [token_counts()[i] for i in positions]
        return _remap(positions, encode_text_prefixes(prefix, todo, counts))

    def row_bytes(position: int) -> int:
        return token_counts()[position] * prefix.hidden_size * 2

    key = text_prefix_key(prefix)

    storage = Storage(
        f"text prefix below {prefix.cut}", "caption", row_bytes, "model.text_tower.unlocked_layers"
    )
    report = storage.reporter(progress, cache.folder("text_prefix", key))
    keys = [caption_key(c) for c in captions]
    rows = cache.rows("text_prefix", key, keys, compute, TEXT_CHUNK, report, half=True)
    assert isinstance(rows, list)
    return rows


def _uncached(items: list[str], compute: Callable[[list[int]], Batches]) -> Tensor:
    first = first_positions(items)
    rows: dict[str, Tensor] = {}
    for positions, batch in compute(sorted(first.values())):
        assert isinstance(batch, Tensor)
        rows.update(zip((items[i] for i in positions), batch, strict=True))
    return torch.stack([rows[item] for item in items]) if items else torch.empty(0)


def compute_frozen_features(
    inputs: ModelInputs,
    records: Sequence[Record],
    cache: FeatureCache,
    num_workers: int = 0,
    progress: bool = True,
    barrier: Callable[[], None] = lambda: None,
    is_writer: bool = True,
    image_noise: NoiseConfig | None = None,
) -> FrozenFeatures:
    """Cached features of the frozen towers in ``inputs`` for ``records`` (images preprocessed by
    its transform); towers that train are not in ``inputs``.

    Under several processes the writer computes and stores what is missing while the others wait
    at ``barrier``, then they read the stored rows. ``image_noise`` perturbs the images first (its
    settings join each image's key); caption noise is already in the records' text, which is the
    key.
    """
    image_noise = active_image_noise(image_noise)
    result = FrozenFeatures()
    image_tower, text_backbone, text_prefix = (
        inputs.image_tower,
        inputs.text_backbone,
        inputs.text_prefix,
    )
    if image_tower is not None:

        def images(writer: bool) -> Tensor:
            return image_features(
                image_tower,
                records,
                inputs.transform,
                cache,
                num_workers=num_workers,
                noise=image_noise,
                progress=progress and writer,
            )

        features = _shared(images, barrier, is_writer)
        result.image = {r.image_id: features[i] for i, r in enumerate(records)}
    if text_backbone is not None:
        captions = [c for r in records for c in r.captions]

        def texts(writer: bool) -> Tensor:
            return caption_features(text_backbone, captions, cache, progress and writer)

        result.text = _per_image(records, _shared(texts, barrier, is_writer))
    elif text_prefix is not None:
        captions = [c for r in records for c in r.captions]

        def prefixes(writer: bool) -> Ragged:
            return caption_prefixes(text_prefix, captions, cache, progress and writer)

        result.text = _per_image(records, _shared(prefixes, barrier, is_writer))
    return result


def _per_image(records: Sequence[Record], rows: Tensor | Ragged) -> dict[int, Tensor | Ragged]:
    """Rows of all captions in record order, split into each image's captions."""
    result, start = {}, 0
    for r in records:
        result[r.image_id] = rows[start : start + len(r.captions)]
        start += len(r.captions)
    return result


def _shared(
    compute: Callable[[bool], Shared], barrier: Callable[[], None], is_writer: bool
) -> Shared:
    """The writer fills the cache first; the others then only read it."""
    if is_writer:
        features = compute(True)
        barrier()
        return features
    barrier()
    return compute(False)
