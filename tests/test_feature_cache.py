"""Frozen-feature cache: hits, misses, invalidation, atomic writes, training on cached features."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from adaptalign.datamodules import frozen_features
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.datasets import load_image
from adaptalign.datamodules.feature_cache import FeatureCache, file_digest, module_digest
from adaptalign.datamodules.generated import GeneratedConfig
from tests.builders import quiet_trainer, tiny_module


def test_hit_miss_and_data_key(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    calls: list[int] = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.arange(6.0).view(3, 2)

    first = cache.get_or_compute("image", "model", "data", 3, compute)
    again = cache.get_or_compute("image", "model", "data", 3, compute)
    assert torch.equal(first, again) and len(calls) == 1
    cache.get_or_compute("image", "model", "other-data", 3, compute)
    cache.get_or_compute("image", "other-model", "data", 3, compute)
    assert len(calls) == 3


def test_unreadable_entry_is_recomputed(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    path = cache.path("text", "m", "d")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"damaged")
    out = cache.get_or_compute("text", "m", "d", 2, lambda: torch.ones(2, 4))
    assert torch.equal(out, torch.ones(2, 4))
    assert torch.equal(cache.load(path, 2), torch.ones(2, 4))


def test_keys_follow_weights_settings_and_file_content(tmp_path: Path) -> None:
    layer = torch.nn.Linear(3, 2)
    key = module_digest(layer, "setting")
    assert module_digest(layer, "setting") == key
    assert module_digest(layer, "other setting") != key
    with torch.no_grad():
        layer.weight[0, 0] += 1e-6
    assert module_digest(layer, "setting") != key

    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for f in files:
        f.write_bytes(b"abc")
    before = file_digest(files, progress=False)
    assert file_digest(files[::-1], progress=False) != before  # order is part of the key
    files[1].write_bytes(b"abd")
    assert file_digest(files, progress=False) != before


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time, torch
    from adaptalign.datamodules.feature_cache import FeatureCache
    real_replace = os.replace
    def stall(src, dst):
        print("written", flush=True)
        time.sleep(60)  # killed here: the data is in the temporary file, not yet in place
    os.replace = stall
    FeatureCache(sys.argv[1]).save(FeatureCache(sys.argv[1]).path("image", "m", "d"),
                                   torch.ones(1000, 64), {})
    """
)


def test_a_killed_write_leaves_no_entry(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = FeatureCache(tmp_path)
    path = cache.path("image", "m", "d")
    assert not path.exists()
    assert list(path.parent.glob(".*.tmp"))  # the killed write's leftover, never read
    assert cache.load(path, 1000) is None
    out = cache.get_or_compute("image", "m", "d", 2, lambda: torch.zeros(2, 3))
    assert torch.equal(out, torch.zeros(2, 3))
    assert not list(path.parent.glob(".*.tmp"))  # the next write cleared it away


def _data(tmp_path: Path) -> AlignmentDataModule:
    return AlignmentDataModule(
        generated=GeneratedConfig(num_train=32, num_val=8, num_test=8, image_size=32),
        cache_dir=str(tmp_path),
        batch_size=8,
    )


def _fit(module: L.LightningModule, data: AlignmentDataModule, root: Path) -> None:
    quiet_trainer(max_epochs=1, default_root_dir=root).fit(module, data)


def test_frozen_towers_train_from_cached_features(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tiny_module(tiny_text_model, image={"freeze": True}, text={"freeze": True})
    data = _data(tmp_path)
    _fit(module, data, tmp_path)
    entries = sorted((tmp_path / "features").rglob("*.pt"))
    assert [e.parent.parent.name for e in entries] == ["image", "text"]

    # The cached image features are the frozen backbone's features of the decoded images.
    batch = next(iter(data.train_dataloader()))
    assert "images" not in batch and batch["image_features"].shape == (8, 96)
    record = next(r for r in data.records if r.image_id == int(batch["image_id"][0]))
    image = module.image_transform()(load_image(record.image_path))[None]
    module.eval()
    with torch.no_grad():
        direct = module.image_tower.features(image)[0]
    assert torch.allclose(batch["image_features"][0], direct, atol=1e-5)
    caption = record.captions[int(batch["caption_index"][0])]
    assert torch.allclose(
        batch["text_features"][0], module.text_tower.encode([caption])[0], atol=1e-5
    )

    # A second run reuses both entries without encoding anything.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(frozen_features, "encode_images", refuse)
    monkeypatch.setattr(frozen_features, "encode_texts", refuse)
    _fit(module, _data(tmp_path), tmp_path)

    # A changed image file invalidates the image entry (and only that one).
    monkeypatch.undo()
    Image.new("RGB", (32, 32), (0, 0, 0)).save(record.image_path)
    _fit(module, _data(tmp_path), tmp_path)
    kinds = [e.parent.parent.name for e in sorted((tmp_path / "features").rglob("*.pt"))]
    assert kinds.count("image") == 2 and kinds.count("text") == 1
