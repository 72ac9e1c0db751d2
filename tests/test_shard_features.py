"""Frozen image features of pairs in WebDataset shards: the rows files give, split between
processes, resumed shard by shard after an interruption, and read back one shard at a time."""

from __future__ import annotations

import fcntl
import io
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from adaptalign.common.errors import DatasetFormatError
from adaptalign.datamodules import frozen_features, shard_features
from adaptalign.datamodules.feature_cache import FeatureCache
from adaptalign.datamodules.frozen_features import image_features, image_model_key
from adaptalign.datamodules.model_inputs import ModelInputs
from adaptalign.datamodules.noise import NoiseConfig
from adaptalign.datamodules.records import Record
from adaptalign.datamodules.shard_features import (
    ShardFeatures,
    assign_shards,
    extract_shard_features,
)
from adaptalign.lightning_modules.towers import ImageTower, ImageTowerConfig

FROZEN = {"freeze": True}
PREFIX = {"unlocked_blocks": 1}  # the cached rows are the frozen prefix's maps, in float16


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward passes of 8 images: still canonical (a shard's few images are filled up), faster."""
    monkeypatch.setattr(frozen_features, "IMAGE_BATCH", 8)
    monkeypatch.setattr(shard_features, "IMAGE_BATCH", 8)


def tiny_tower(**settings: object) -> ImageTower:
    torch.manual_seed(0)
    return ImageTower(ImageTowerConfig("test_resnet", image_size=32, **settings), embed_dim=8)


def inputs_of(tower: ImageTower) -> ModelInputs:
    return ModelInputs(transform=tower.transform(), image_tower=tower)


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Shards:
    """``sizes`` shards of generated PNG images with captions, and the same images as files."""

    def __init__(self, folder: Path, sizes: list[int]) -> None:
        self.urls: list[str] = []
        self.keys: list[list[str]] = []
        self.files: dict[tuple[str, str], Path] = {}
        (folder / "files").mkdir(parents=True)
        image = 0
        for number, size in enumerate(sizes):
            url = str(folder / f"shard-{number:06d}.tar")
            keys = [f"{number:03d}{i:04d}" for i in range(size)]
            with wds.TarWriter(url) as writer:
                for key in keys:
                    data = png_bytes(image)
                    writer.write({"__key__": key, "png": data, "txt": f"image {image}"})
                    path = folder / "files" / f"{key}.png"
                    path.write_bytes(data)
                    self.files[(url, key)] = path
                    image += 1
            self.urls.append(url)
            self.keys.append(keys)

    def plan(self) -> tuple[list[str], list[list[str]]]:
        return self.urls, self.keys

    def image_ids(self) -> list[list[int]]:
        """Ordinals over all shards, as records of a shard set number their images."""
        ordinals = iter(range(len(self.files)))
        return [[next(ordinals) for _ in keys] for keys in self.keys]

    def records(self, image_ids: list[list[int]] | None = None) -> list[Record]:
        """The same images as files, one record each."""
        ids = image_ids or self.image_ids()
        return [
            Record(self.files[(url, key)], ("a caption",), image_id, "train")
            for url, keys, shard_ids in zip(self.urls, self.keys, ids, strict=True)
            for key, image_id in zip(keys, shard_ids, strict=True)
        ]


class Forwards:
    """Counts the tower's forward passes; the ``fail_at``-th one (1-based) raises instead."""

    def __init__(self, tower: ImageTower, fail_at: int | None = None) -> None:
        self.real, self.fail_at = tower.frozen_features, fail_at
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise Stopped
        return self.real(images)


class Stopped(Exception):
    """Stands for whatever stops a run (Ctrl-C, an out-of-memory error)."""


def extract(shards: Shards, tower: ImageTower, cache: FeatureCache, **kwargs) -> ShardFeatures:
    keys = kwargs.pop("keys", shards.keys)
    return extract_shard_features(
        shards.urls, keys, inputs_of(tower), cache, progress=False, **kwargs
    )


def rows_of(features: ShardFeatures, shards: Shards) -> list[torch.Tensor]:
    """Every image's row, shard by shard in key order (the order of ``Shards.records``)."""
    return [
        features[(url, key)]
        for url, keys in zip(shards.urls, shards.keys, strict=True)
        for key in keys
    ]


def streamed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The shards extraction streams, in order."""
    urls: list[str] = []
    real = shard_features.read_samples

    def recording(url: str, extensions: object) -> Iterator:
        urls.append(url)
        return real(url, extensions)

    monkeypatch.setattr(shard_features, "read_samples", recording)
    return urls


@pytest.mark.parametrize("settings", [FROZEN, PREFIX], ids=["frozen", "prefix"])
def test_shard_rows_are_the_rows_of_the_same_images_read_from_files(
    tmp_path: Path, settings: dict
) -> None:
    shards = Shards(tmp_path, [5, 3, 4])
    tower = tiny_tower(**settings)
    records = shards.records()
    from_files = image_features(
        tower, records, tower.transform(), FeatureCache(tmp_path / "files-cache"), progress=False
    )
    features = extract(shards, tower, FeatureCache(tmp_path / "shard-cache"))
    from_shards = torch.stack(rows_of(features, shards))
    assert from_shards.dtype == from_files.dtype
    assert torch.equal(from_shards, from_files)  # canonical batches: exactly the same rows
    key = image_model_key(tower, tower.transform())
    assert len(FeatureCache(tmp_path / "shard-cache").chunks("image", key)) == 3  # one per shard


def test_a_run_reading_files_finds_the_rows_a_shard_extraction_stored(tmp_path: Path) -> None:
    shards = Shards(tmp_path, [3, 3])
    tower = tiny_tower(**FROZEN)
    cache = FeatureCache(tmp_path / "cache")
    features = extract(shards, tower, cache)
    counted = Forwards(tower)
    tower.frozen_features = counted  # type: ignore[method-assign]
    records = shards.records()
    from_files = image_features(tower, records, tower.transform(), cache, progress=False)
    assert counted.calls == 0
    assert torch.equal(from_files, torch.stack(rows_of(features, shards)))


def test_two_processes_extract_disjoint_shards_and_together_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = Shards(tmp_path, [4, 2, 3, 1, 2])
    tower = tiny_tower(**FROZEN)
    cache = FeatureCache(tmp_path / "cache")
    urls = streamed(monkeypatch)
    extract(shards, tower, cache, rank=0, world=2)
    first = list(urls)
    urls.clear()
    features = extract(shards, tower, cache, rank=1, world=2)
    second = list(urls)
    assert first and second and not set(first) & set(second)
    assert sorted(first + second) == sorted(shards.urls)
    # The split is balanced by images: 6 of the 12 on each process.
    sizes = dict(zip(shards.urls, map(len, shards.keys), strict=True))
    assert sum(sizes[u] for u in first) == sum(sizes[u] for u in second) == 6

    whole = extract(shards, tower, FeatureCache(tmp_path / "one-process"))
    for url, keys in zip(shards.urls, shards.keys, strict=True):
        for key in keys:
            assert torch.equal(features[(url, key)], whole[(url, key)])


def test_assign_shards_balances_images_and_is_decided_by_sizes_alone() -> None:
    assert assign_shards([5, 1, 1, 1, 4], 2) == [[0, 2], [1, 3, 4]]
    assert assign_shards([2, 2, 2], 1) == [[0, 1, 2]]
    assert assign_shards([3, 3], 3) == [[0], [1], []]
    with pytest.raises(ValueError, match="world"):
        assign_shards([1], 0)


def test_an_interrupted_extraction_resumes_at_the_shard_it_stopped_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = Shards(tmp_path, [3, 3, 3, 3])  # one forward pass per shard
    tower = tiny_tower(**FROZEN)
    uninterrupted = extract(shards, tower, FeatureCache(tmp_path / "whole"))

    cache = FeatureCache(tmp_path / "cache")
    key = image_model_key(tower, tower.transform())
    tower.frozen_features = Forwards(tower, fail_at=3)  # type: ignore[method-assign]
    with pytest.raises(Stopped):
        extract(shards, tower, cache)
    assert len(cache.chunks("image", key)) == 2  # the two shards finished before it

    counted = Forwards(tower)
    tower.frozen_features = counted  # type: ignore[method-assign]
    urls = streamed(monkeypatch)
    resumed = extract(shards, tower, cache)
    assert counted.calls == 2 and urls == shards.urls[2:]  # the first two are not even read
    assert len(cache.chunks("image", key)) == 4
    for url, keys in zip(shards.urls, shards.keys, strict=True):
        for k in keys:
            assert torch.equal(resumed[(url, k)], uninterrupted[(url, k)])

    # Complete now: nothing is read or computed again.
    urls.clear()
    extract(shards, tower, cache)
    assert urls == [] and counted.calls == 2


def test_read_shard_yields_the_keys_in_use_in_the_shards_order(tmp_path: Path) -> None:
    shards = Shards(tmp_path, [6, 2])
    tower = tiny_tower(**FROZEN)
    in_use = [[shards.keys[0][i] for i in (4, 1, 3)], []]  # given in any order
    features = extract(shards, tower, FeatureCache(tmp_path / "cache"), keys=in_use)
    read = list(features.read_shard(shards.urls[0]))
    assert [key for key, _ in read] == [shards.keys[0][i] for i in (1, 3, 4)]
    for key, item in read:
        assert set(item) == {"image_features"}
        assert torch.equal(item["image_features"], features[(shards.urls[0], key)])
    assert list(features.read_shard(shards.urls[1])) == []
    with pytest.raises(KeyError):
        features[(shards.urls[0], shards.keys[0][0])]  # not in use


def test_a_later_run_that_uses_more_of_a_shard_computes_only_the_new_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = Shards(tmp_path, [6])
    tower = tiny_tower(**FROZEN)
    cache = FeatureCache(tmp_path / "cache")
    decoded: list[str] = []
    real = shard_features.decode_image

    def counting(data: bytes, source: str) -> Image.Image:
        decoded.append(source.rsplit("/", 1)[1])
        return real(data, source)

    monkeypatch.setattr(shard_features, "decode_image", counting)
    extract(shards, tower, cache, keys=[shards.keys[0][:2]])
    assert decoded == shards.keys[0][:2]
    decoded.clear()
    features = extract(shards, tower, cache, keys=[shards.keys[0][1:4]])
    assert decoded == shards.keys[0][2:4]
    assert [key for key, _ in features.read_shard(shards.urls[0])] == shards.keys[0][1:4]
    assert len(cache.chunks("image", image_model_key(tower, tower.transform()))) == 2

    whole = extract(shards, tower, FeatureCache(tmp_path / "whole"))
    for key in shards.keys[0][1:4]:
        assert torch.equal(features[(shards.urls[0], key)], whole[(shards.urls[0], key)])


def test_noisy_images_get_their_own_rows_keyed_by_image_id(tmp_path: Path) -> None:
    shards = Shards(tmp_path, [3, 2])
    tower = tiny_tower(**FROZEN)
    noise = NoiseConfig(image_rate=0.5)
    ids = shards.image_ids()
    cache = FeatureCache(tmp_path / "cache")
    clean = extract(shards, tower, cache)
    noisy = extract(shards, tower, cache, image_noise=noise, image_ids=ids)
    folder = cache.folder("image", image_model_key(tower, tower.transform()))
    assert len(list(folder.glob("chunk-*.pt"))) == 4  # other item keys: new chunks
    url, key = shards.urls[0], shards.keys[0][0]
    assert not torch.equal(clean[(url, key)], noisy[(url, key)])

    # The noisy rows of files with the same image ids, exactly.
    records = shards.records(ids)
    from_files = image_features(
        tower,
        records,
        tower.transform(),
        FeatureCache(tmp_path / "files"),
        noise=noise,
        progress=False,
    )
    assert torch.equal(from_files, torch.stack(rows_of(noisy, shards)))

    # Other image ids draw other noise.
    shifted = [[i + 100 for i in shard_ids] for shard_ids in ids]
    other = extract(shards, tower, cache, image_noise=noise, image_ids=shifted)
    assert not torch.equal(other[(url, key)], noisy[(url, key)])
    # A rate of 0 is no noise: the clean rows.
    off = extract(shards, tower, cache, image_noise=NoiseConfig(image_rate=0.0))
    assert torch.equal(off[(url, key)], clean[(url, key)])
    with pytest.raises(ValueError, match="image_ids"):
        extract(shards, tower, cache, image_noise=noise)


def test_a_run_started_beside_another_waits_for_its_shard_and_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another process extracts a shard (holding its lock), a second waits, then finds it
    complete and computes nothing."""
    shards = Shards(tmp_path, [3])
    tower = tiny_tower(**FROZEN)
    other = FeatureCache(tmp_path / "other")  # what the other process will have stored
    extract(shards, tower, other)
    cache = FeatureCache(tmp_path / "cache")
    key = image_model_key(tower, tower.transform())
    stored = other.folder("image", key)
    manifest = next((stored / shard_features.MANIFESTS).glob("*.json"))
    lock = cache.folder("image", key) / shard_features.MANIFESTS / f"{manifest.stem}.lock"
    lock.parent.mkdir(parents=True)
    waiting = threading.Event()
    monkeypatch.setattr(shard_features, "say", lambda text: waiting.set())
    counted = Forwards(tower)
    tower.frozen_features = counted  # type: ignore[method-assign]
    result: list[ShardFeatures] = []
    with open(lock, "a") as held:  # the other process's hold on the shard
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        second = threading.Thread(target=lambda: result.append(extract(shards, tower, cache)))
        second.start()
        assert waiting.wait(timeout=120), "the second run did not wait for the shard"
        for path in [*stored.glob("chunk-*.pt"), manifest]:  # the other process finishes
            target = cache.folder("image", key) / path.relative_to(stored)
            shutil.copyfile(path, target)
    second.join(timeout=120)
    assert counted.calls == 0
    url, first = shards.urls[0], shards.keys[0][0]
    assert torch.equal(
        result[0][(url, first)], ShardFeatures(other, key, *shards.plan())[(url, first)]
    )


def test_a_key_in_use_without_an_image_names_the_shard_and_the_key(tmp_path: Path) -> None:
    shards = Shards(tmp_path, [2])
    tower = tiny_tower(**FROZEN)
    with pytest.raises(DatasetFormatError, match=r"shard-000000\.tar.*'absent'"):
        extract(shards, tower, FeatureCache(tmp_path / "cache"), keys=[["absent"]])


def test_a_shard_whose_chunk_is_gone_is_extracted_again(tmp_path: Path) -> None:
    shards = Shards(tmp_path, [2, 2])
    tower = tiny_tower(**FROZEN)
    cache = FeatureCache(tmp_path / "cache")
    first = extract(shards, tower, cache)
    row = first[(shards.urls[1], shards.keys[1][0])]
    chunks = cache.chunks("image", image_model_key(tower, tower.transform()))
    for chunk in chunks:
        chunk.unlink()
    counted = Forwards(tower)
    tower.frozen_features = counted  # type: ignore[method-assign]
    again = extract(shards, tower, cache)
    assert counted.calls == 2
    assert torch.equal(again[(shards.urls[1], shards.keys[1][0])], row)


def test_features_read_before_extraction_say_so(tmp_path: Path) -> None:
    shards = Shards(tmp_path, [2, 2])
    tower = tiny_tower(**FROZEN)
    cache = FeatureCache(tmp_path / "cache")
    features = extract(shards, tower, cache, rank=0, world=2)
    assert features[(shards.urls[0], shards.keys[0][0])].shape == (tower.feature_dim,)
    with pytest.raises(RuntimeError, match="extract_shard_features"):
        features[(shards.urls[1], shards.keys[1][0])]
