"""Frozen image features of pairs stored in WebDataset shards, extracted shard by shard.

A shard is read by streaming it whole, so the shard is the unit of extraction: each process takes
its own shards, streams each once, encodes the images its run uses and stores their rows as one
chunk of the feature cache. A small manifest per shard, written after its chunk, maps the shard's
sample keys to their rows. It makes a restart cheap: a shard whose manifest already covers the keys
in use is skipped without being read, so a killed extraction loses at most the shard it was in. A
later run that uses more of a shard adds one chunk holding just the new rows.

The rows are those of :mod:`adaptalign.datamodules.frozen_features`: the same model key (folder),
the same canonical forward passes of exactly ``IMAGE_BATCH`` images, and item keys made from the
image's bytes the same way (:func:`image_bytes_key`). An image stored in a shard and the same image
read from a file therefore have one row, and a run that reads files finds the rows a shard
extraction stored.

Training then reads a shard's features (:meth:`ShardFeatures.read_shard`) instead of decoding its
images; a shard's chunks are opened memory-mapped when it is read, a few shards at a time.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from adaptalign.common.atomic_files import atomic_save, exclusive
from adaptalign.common.errors import DatasetFormatError
from adaptalign.common.progress import progress_bar, say
from adaptalign.datamodules.datasets import Transform, decode_image
from adaptalign.datamodules.feature_cache import (
    FeatureCache,
    check_space,
    digest,
    in_half,
    read_chunk,
    size_text,
)
from adaptalign.datamodules.frozen_features import (
    IMAGE_BATCH,
    active_image_noise,
    forward_images,
    image_bytes_key,
    image_model_key,
    image_storage,
    tower_device,
)
from adaptalign.datamodules.model_inputs import FeatureTower, ModelInputs
from adaptalign.datamodules.noise import NoiseConfig
from adaptalign.datamodules.shard_files import IMAGE_EXTENSIONS, read_samples, shard_identity

log = logging.getLogger(__name__)

# The cache kind of image rows, shared with frozen_features (files and shards share rows).
KIND = "image"
# The subfolder of a model's cache folder that holds the shards' manifests.
MANIFESTS = "shards"
# Shards a reader keeps open: the one being read and the one before (a shard boundary).
OPEN_SHARDS = 2

Sample = tuple[str, int | None]
"""A sample's key in its shard and, for noisy images (drawn per image id), its image id."""


def assign_shards(sizes: Sequence[int], world: int) -> list[list[int]]:
    """Shard indices per process, balanced by the images each encodes: the largest shard first to
    the least loaded process (ties to the lower rank), each list in shard order.

    Decided from ``sizes`` alone, so every process computes the same split without talking.
    """
    if world < 1:
        raise ValueError(f"world={world}; expected >= 1")
    loads, owned = [0] * world, [[] for _ in range(world)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owned[rank].append(index)
        loads[rank] += sizes[index]
    return [sorted(indices) for indices in owned]


def samples_in_use(
    keys_in_use: Sequence[Sequence[str]],
    image_ids: Sequence[Sequence[int]] | None,
    noise: NoiseConfig | None,
) -> list[list[Sample]]:
    """Per shard its samples in use; image ids join them only when images are noisy."""
    if noise is None:
        return [[(key, None) for key in keys] for keys in keys_in_use]
    if image_ids is None:
        raise ValueError("noisy images are drawn per image id: give image_ids with keys_in_use")
    if len(image_ids) != len(keys_in_use):
        raise ValueError(f"{len(image_ids)} lists of image ids for {len(keys_in_use)} shards")
    return [
        [(key, int(i)) for key, i in zip(keys, ids, strict=True)]
        for keys, ids in zip(keys_in_use, image_ids, strict=True)
    ]


def manifest_path(folder: Path, url: str, noise: NoiseConfig | None) -> Path:
    """Where a shard's manifest lives: named by the shard's identity (a rewritten shard gets a new
    one) and the image noise (noisy rows are other rows)."""
    name = digest([shard_identity(url).encode(), repr(noise).encode()])
    return folder / MANIFESTS / f"{name}.json"


@dataclass
class Manifest:
    """Which of a shard's samples have rows, and where: ``samples`` holds
    ``(key, image id or None, chunk index, row)`` in the shard's order."""

    shard: str
    chunks: list[str] = field(default_factory=list)
    samples: list[tuple[str, int | None, int, int]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path, url: str, folder: Path) -> Manifest:
        """The stored manifest without samples whose chunk is gone (they are computed again); an
        empty one when there is none or it is unreadable."""
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            chunks = [str(name) for name in entry["chunks"]]
            samples = [(str(k), i, int(c), int(r)) for k, i, c, r in entry["samples"]]
        except FileNotFoundError:
            return cls(url)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "shard manifest %s is unreadable (%s); its shard is extracted again", path, exc
            )
            return cls(url)
        present = {c for c, name in enumerate(chunks) if (folder / name).is_file()}
        return cls(url, chunks, [s for s in samples if s[2] in present])

    def save(self, path: Path) -> None:
        entry = {"shard": self.shard, "chunks": self.chunks, "samples": self.samples}
        atomic_save(path, json.dumps(entry, separators=(",", ":")))

    def stored(self) -> dict[Sample, tuple[int, int]]:
        return {(key, image_id): (chunk, row) for key, image_id, chunk, row in self.samples}

    def missing(self, samples: Sequence[Sample]) -> dict[str, int | None]:
        """Samples in use that have no row yet, as key -> image id."""
        stored = self.stored()
        return {key: image_id for key, image_id in samples if (key, image_id) not in stored}


@dataclass
class EncodedShard:
    """One pass over a shard: its new rows (one per distinct image), the row of each new sample,
    and every sample key's position in the shard (to keep the manifest in the shard's order)."""

    items: list[str]
    rows: Tensor
    sample_rows: dict[str, int]
    positions: dict[str, int]


@dataclass
class ShardEncoder:
    """Encodes the images of a shard's samples, with frozen_features' canonical batches."""

    tower: FeatureTower
    transform: Transform
    noise: NoiseConfig | None
    device: torch.device

    def encode(self, url: str, wanted: Mapping[str, int | None]) -> EncodedShard:
        """Streams ``url`` once and encodes the images of the ``wanted`` keys (key -> image id);
        an image that occurs twice in the shard (same bytes) is encoded once."""
        items: dict[str, int] = {}
        sample_rows: dict[str, int] = {}
        positions: dict[str, int] = {}
        waiting: list[Tensor] = []
        parts: list[Tensor] = []
        for key, members in read_samples(url, IMAGE_EXTENSIONS):
            positions.setdefault(key, len(positions))
            if key not in wanted or key in sample_rows:
                continue
            data = image_member(url, key, members)
            item = image_bytes_key(data, self.noise, wanted[key])
            if item not in items:
                items[item] = len(items)
                waiting.append(self.pixels(data, f"{url}/{key}", wanted[key]))
                if len(waiting) == IMAGE_BATCH:
                    parts.append(self.forward(waiting))
            sample_rows[key] = items[item]
        if waiting:
            parts.append(self.forward(waiting))
        absent = [key for key in wanted if key not in sample_rows]
        if absent:
            raise DatasetFormatError(
                f"{url}: no image member ({', '.join(IMAGE_EXTENSIONS)}) for {len(absent)} "
                f"sample(s) in use, e.g. {absent[0]!r}; expected the samples its index listed "
                "(was the shard changed in place?)"
            )
        return EncodedShard(list(items), torch.cat(parts), sample_rows, positions)

    def pixels(self, data: bytes, source: str, image_id: int | None) -> Tensor:
        """Decoded, noised (keyed by the image id, as for files) and preprocessed."""
        image: Image.Image = decode_image(data, source)
        if self.noise is not None and image_id is not None:
            image = self.noise.image(image, image_id)
        return self.transform(image)

    def forward(self, waiting: list[Tensor]) -> Tensor:
        rows = forward_images(self.tower, torch.stack(waiting), self.device)
        waiting.clear()
        return rows


def image_member(url: str, key: str, members: Mapping[str, bytes]) -> bytes:
    """The sample's image bytes, from its first member with an image extension."""
    lowered = {extension.lower(): data for extension, data in members.items()}
    for extension in IMAGE_EXTENSIONS:
        if extension in lowered:
            return lowered[extension]
    raise DatasetFormatError(
        f"{url}: sample {key!r} has no image member; expected one of {', '.join(IMAGE_EXTENSIONS)}"
    )


@dataclass(frozen=True)
class ShardJob:
    """One shard to extract on this process: its samples in use and its manifest."""

    url: str
    samples: list[Sample]
    manifest: Path


@dataclass
class Extraction:
    """What one process stores: the cache folder of the model and how its rows are stored."""

    cache: FeatureCache
    model_key: str
    encoder: ShardEncoder
    half: bool

    @property
    def folder(self) -> Path:
        return self.cache.folder(KIND, self.model_key)

    def missing(self, job: ShardJob) -> dict[str, int | None]:
        return Manifest.read(job.manifest, job.url, self.folder).missing(job.samples)

    def run(self, job: ShardJob) -> None:
        """Extracts the shard's missing rows into one chunk, then writes its manifest (what marks
        the shard complete). One process at a time per shard: runs started side by side (a
        comparison's jobs) wait and then find the shard done."""
        lock = job.manifest.with_suffix(".lock")
        with exclusive(lock, on_wait=lambda: say(f"{job.url}: waiting for another process")):
            manifest = Manifest.read(job.manifest, job.url, self.folder)
            wanted = manifest.missing(job.samples)
            if not wanted:
                return
            encoded = self.encoder.encode(job.url, wanted)
            rows = in_half(encoded.rows, KIND) if self.half else encoded.rows
            chunk = self.cache.write_chunk(KIND, self.model_key, encoded.items, rows)
            extended(manifest, chunk.name, encoded, wanted).save(job.manifest)


def extended(
    manifest: Manifest, chunk: str, encoded: EncodedShard, wanted: Mapping[str, int | None]
) -> Manifest:
    """The manifest with a new chunk's samples, all in the shard's order."""
    index = len(manifest.chunks)
    samples = manifest.samples + [
        (key, wanted[key], index, row) for key, row in encoded.sample_rows.items()
    ]
    last = len(encoded.positions)
    samples.sort(key=lambda sample: encoded.positions.get(sample[0], last))
    return Manifest(manifest.shard, [*manifest.chunks, chunk], samples)


def extract_shard_features(
    shards: Sequence[str],
    keys_in_use: Sequence[Sequence[str]],
    inputs: ModelInputs,
    cache: FeatureCache,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
    image_noise: NoiseConfig | None = None,
    image_ids: Sequence[Sequence[int]] | None = None,
) -> ShardFeatures:
    """The frozen image tower's rows of every shard's ``keys_in_use``, computing what is missing.

    Process ``rank`` of ``world`` extracts its share of the shards (:func:`assign_shards`), one
    chunk per shard, skipping shards already complete; after ``barrier`` every process reads all
    shards' rows. ``image_ids`` (parallel to ``keys_in_use``) are needed for noisy images, which
    are perturbed and keyed per image id as images read from files are.
    """
    tower = inputs.image_tower
    if tower is None:
        raise ValueError("no frozen image tower in inputs: there are no image features to extract")
    if len(keys_in_use) != len(shards):
        raise ValueError(f"{len(keys_in_use)} lists of keys for {len(shards)} shards")
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} of world={world}; expected 0 <= rank < world")
    noise = active_image_noise(image_noise)
    samples = samples_in_use(keys_in_use, image_ids, noise)
    model_key = image_model_key(tower, inputs.transform)
    extraction = Extraction(
        cache,
        model_key,
        ShardEncoder(tower, inputs.transform, noise, tower_device(tower)),
        half=bool(tower.cut),
    )
    mine = assign_shards([len(s) for s in samples], world)[rank]
    jobs = [
        ShardJob(shards[i], samples[i], manifest_path(extraction.folder, shards[i], noise))
        for i in mine
    ]
    _extract(extraction, jobs, progress)
    barrier()
    return ShardFeatures(cache, model_key, shards, keys_in_use, image_ids, image_noise)


def _extract(extraction: Extraction, jobs: Sequence[ShardJob], progress: bool) -> None:
    """The shards of ``jobs`` not complete yet, after saying (and checking) what they will take."""
    pending = [(job, len(missing)) for job in jobs if (missing := extraction.missing(job))]
    if not pending:
        return
    storage = image_storage(extraction.encoder.tower)
    images = sum(count for _, count in pending)
    needed = images * storage.row_bytes(0)
    folder = extraction.folder
    check_space(folder, needed, f"{storage.desc} for {images} images", storage.setting)
    if progress:
        complete = len(jobs) - len(pending)
        say(
            f"{storage.desc}: {images} images of {len(pending)} shards to compute, "
            f"{size_text(needed)} ({f'{complete} shards complete, ' if complete else ''}"
            f"stored in {folder}, one chunk per shard: an interrupted run resumes at the shard "
            "it stopped in)"
        )
    with progress_bar(len(pending), storage.desc, "shard", progress) as bar:
        for job, _ in pending:
            extraction.run(job)
            bar.update(1)


class ShardFeatures:
    """The stored rows of every shard's samples in use, read one shard at a time.

    A shard's chunks are opened memory-mapped when it is first read and the last ``capacity``
    shards are kept open, so a stream over many shards never holds them all in memory. Rows come
    out as copies: a row sent to a data-loader worker's queue then carries itself, not its chunk.
    """

    def __init__(
        self,
        cache: FeatureCache,
        model_key: str,
        shards: Sequence[str],
        keys_in_use: Sequence[Sequence[str]],
        image_ids: Sequence[Sequence[int]] | None = None,
        image_noise: NoiseConfig | None = None,
        capacity: int = OPEN_SHARDS,
    ) -> None:
        self.folder = cache.folder(KIND, model_key)
        self.noise = active_image_noise(image_noise)
        self.samples = dict(
            zip(shards, samples_in_use(keys_in_use, image_ids, self.noise), strict=True)
        )
        self.capacity = capacity
        self.open: OrderedDict[str, dict[str, Tensor]] = OrderedDict()

    def __getstate__(self) -> dict:
        """Pickled (to a data-loader worker) without the open shards: each process maps its own."""
        state = dict(self.__dict__)
        state["open"] = OrderedDict()
        return state

    @property
    def shards(self) -> list[str]:
        return list(self.samples)

    def read_shard(self, url: str) -> Iterator[tuple[str, dict[str, Tensor]]]:
        """``(key, {"image_features": row})`` of the shard's samples in use, in the shard's order:
        what a training stream reads instead of the shard's images."""
        for key, row in self.rows(url).items():
            yield key, {"image_features": row.clone()}

    def __getitem__(self, sample: tuple[str, str]) -> Tensor:
        """The row of ``(shard, key)``."""
        url, key = sample
        return self.rows(url)[key].clone()

    def rows(self, url: str) -> dict[str, Tensor]:
        """The shard's rows by key in the shard's order, as views of its memory-mapped chunks."""
        if url in self.open:
            self.open.move_to_end(url)
            return self.open[url]
        if url not in self.samples:
            raise KeyError(f"{url} is not one of the shards these features were extracted for")
        rows = self._load(url)
        self.open[url] = rows
        while len(self.open) > self.capacity:
            self.open.popitem(last=False)
        return rows

    def _load(self, url: str) -> dict[str, Tensor]:
        manifest = Manifest.read(manifest_path(self.folder, url, self.noise), url, self.folder)
        wanted = set(self.samples[url])
        chunks: dict[int, Tensor] = {}
        rows: dict[str, Tensor] = {}
        for key, image_id, chunk, row in manifest.samples:
            if (key, image_id) in wanted and key not in rows:
                if chunk not in chunks:
                    chunks[chunk] = self._chunk(url, manifest.chunks[chunk])
                rows[key] = chunks[chunk][row]
        if len(rows) < len(wanted):
            missing = next(key for key, _ in self.samples[url] if key not in rows)
            raise RuntimeError(
                f"{url}: no stored image features for {len(wanted) - len(rows)} of its samples in "
                f"use, e.g. {missing!r}; extract_shard_features stores them first"
            )
        return rows

    def _chunk(self, url: str, name: str) -> Tensor:
        chunk = read_chunk(self.folder / name)
        if chunk is None:
            raise RuntimeError(
                f"{url}: its feature chunk {self.folder / name} is gone or damaged; extract the "
                "shard features again"
            )
        return chunk[1]
