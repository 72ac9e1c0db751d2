"""Frozen-feature cache: per-item rows, resumable extraction, subsets, keys, DDP and training."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from adaptalign.callbacks.model_inputs import model_inputs
from adaptalign.datamodules import feature_cache, frozen_features
from adaptalign.datamodules import generated as g
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.datasets import load_image
from adaptalign.datamodules.feature_cache import FeatureCache, module_digest
from adaptalign.datamodules.frozen_features import (
    caption_features,
    compute_frozen_features,
    image_key,
    text_model_key,
)
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.datamodules.noise import NoiseConfig
from adaptalign.datamodules.records import Record
from adaptalign.encoders.text_models import load_text_model
from tests.helpers.builders import quiet_trainer, tiny_module
from tests.helpers.captions import some_captions
from tests.helpers.distributed import run_distributed

# --------------------------------------------------------------------------- whole entries


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


@pytest.mark.slow
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


# --------------------------------------------------------------------------- per-item rows


def row(key: str) -> torch.Tensor:
    """The features a fake encoder gives item ``key`` ("7" -> [7, 70])."""
    return torch.tensor([float(key), 10.0 * float(key)])


class FakeEncoder:
    """Yields rows in batches of ``batch`` and records which items it was asked for."""

    def __init__(self, keys: list[str], batch: int = 2) -> None:
        self.keys, self.batch = keys, batch
        self.asked: list[str] = []

    def __call__(self, positions: list[int]) -> Iterator[tuple[list[int], torch.Tensor]]:
        self.asked += [self.keys[i] for i in positions]
        for start in range(0, len(positions), self.batch):
            part = positions[start : start + self.batch]
            yield part, torch.stack([row(self.keys[i]) for i in part])


def test_rows_compute_only_missing_items(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    small = ["3", "1", "4", "1"]  # a repeat is computed once and returned twice
    encoder = FakeEncoder(small)
    out = cache.rows("text", "m", small, encoder, chunk_rows=2)
    assert encoder.asked == ["3", "1", "4"]
    assert torch.equal(out, torch.stack([row(k) for k in small]))

    # A larger request adds only the items not stored yet; what is stored is read back as is.
    large = ["5", "9", "2", "6", "3", "1", "4"]
    encoder = FakeEncoder(large)
    out = cache.rows("text", "m", large, encoder, chunk_rows=2)
    assert encoder.asked == ["5", "9", "2", "6"]
    assert torch.equal(out, torch.stack([row(k) for k in large]))

    encoder = FakeEncoder(large)
    assert torch.equal(cache.rows("text", "m", large, encoder, chunk_rows=2), out)
    assert encoder.asked == []
    # Another model never sees these rows.
    encoder = FakeEncoder(small)
    cache.rows("text", "other", small, encoder, chunk_rows=2)
    assert encoder.asked == ["3", "1", "4"]


def test_runs_side_by_side_fill_the_cache_once(tmp_path: Path, monkeypatch) -> None:
    """While another process fills a model's folder, a second one waits and reads its rows."""
    cache = FeatureCache(tmp_path)
    keys = ["1", "2", "3"]
    waiting = threading.Event()
    monkeypatch.setattr(feature_cache, "say", lambda text: waiting.set())
    encoder = FakeEncoder(keys)
    result: list[torch.Tensor] = []
    lock = cache.folder("text", "m") / feature_cache.FILLING_LOCK
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as other:  # the other process's hold on the folder
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        second = threading.Thread(
            target=lambda: result.append(cache.rows("text", "m", keys, encoder, chunk_rows=2))
        )
        second.start()
        assert waiting.wait(timeout=120), "the second run did not wait for the lock"
        # What the other process computes while the second one waits.
        cache.write_chunk("text", "m", keys, torch.stack([row(k) for k in keys]))
    second.join(timeout=120)
    assert encoder.asked == []
    assert torch.equal(result[0], torch.stack([row(k) for k in keys]))


KILLED_EXTRACTION = textwrap.dedent(
    """
    import os, signal, sys, time, torch
    from adaptalign.datamodules.feature_cache import FeatureCache
    folder, mode = sys.argv[1], sys.argv[2]
    keys = [str(i) for i in range(10)]
    if mode == "in-write":  # killed while the first chunk is being renamed into place
        def stall(src, dst):
            print("writing", flush=True)
            time.sleep(60)
        os.replace = stall
    def encode(positions):
        for start in range(0, len(positions), 2):
            if mode == "between" and start == 6:  # after the chunk of items 0-3 and one batch
                print("killing", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            part = positions[start : start + 2]
            yield part, torch.tensor([[float(keys[i]), 10.0 * float(keys[i])] for i in part])
    FeatureCache(folder).rows("image", "m", keys, encode, chunk_rows=4)
    """
)


def killed_extraction(folder: Path, mode: str, expect: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_EXTRACTION, str(folder), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == expect
    if mode == "in-write":
        os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


@pytest.mark.slow
def test_a_killed_extraction_resumes_after_its_last_complete_chunk(tmp_path: Path) -> None:
    keys = [str(i) for i in range(10)]
    killed_extraction(tmp_path, "between", "killing")
    cache = FeatureCache(tmp_path)
    assert len(cache.chunks("image", "m")) == 1
    assert sorted(cache.read_rows("image", "m", set(keys))) == ["0", "1", "2", "3"]

    encoder = FakeEncoder(keys)
    resumed = cache.rows("image", "m", keys, encoder, chunk_rows=4)
    assert encoder.asked == keys[4:]  # items 4 and 5 were computed, never stored: again
    uninterrupted = FeatureCache(tmp_path / "fresh").rows(
        "image", "m", keys, FakeEncoder(keys), chunk_rows=4
    )
    assert torch.equal(resumed, uninterrupted)


@pytest.mark.slow
def test_a_chunk_killed_while_written_is_never_read(tmp_path: Path) -> None:
    killed_extraction(tmp_path, "in-write", "writing")
    cache = FeatureCache(tmp_path)
    folder = cache.folder("image", "m")
    assert cache.chunks("image", "m") == [] and list(folder.glob(".*.tmp"))
    keys = [str(i) for i in range(10)]
    encoder = FakeEncoder(keys)
    out = cache.rows("image", "m", keys, encoder, chunk_rows=4)
    assert encoder.asked == keys and torch.equal(out, torch.stack([row(k) for k in keys]))
    assert not list(folder.glob(".*.tmp"))  # a complete write cleared the leftover away


def test_an_unreadable_chunk_is_removed_and_its_items_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = FeatureCache(tmp_path)
    keys = ["1", "2", "3", "4"]
    cache.rows("text", "m", keys, FakeEncoder(keys), chunk_rows=2)
    damaged = cache.chunks("text", "m")[0]
    damaged.write_bytes(b"damaged")
    encoder = FakeEncoder(keys)
    out = cache.rows("text", "m", keys, encoder, chunk_rows=2)
    assert len(encoder.asked) == 2 and torch.equal(out, torch.stack([row(k) for k in keys]))
    assert f"{damaged} is unreadable" in caplog.text
    assert len(cache.chunks("text", "m")) == 2


def test_keys_follow_weights_settings_and_content(tmp_path: Path, tiny_text_model: str) -> None:
    layer = torch.nn.Linear(3, 2)
    key = module_digest(layer, "setting")
    assert module_digest(layer, "setting") == key
    assert module_digest(layer, "other setting") != key
    with torch.no_grad():
        layer.weight[0, 0] += 1e-6
    assert module_digest(layer, "setting") != key

    path = tmp_path / "a.png"
    path.write_bytes(b"abc")
    record = Record(path, ("a caption",), image_id=1, split="train")
    clean = image_key(record, None)
    # The name and id do not matter for a clean image; its bytes do.
    path.rename(tmp_path / "b.png")
    assert image_key(Record(tmp_path / "b.png", (), image_id=2, split="val"), None) == clean
    noise = NoiseConfig(image_rate=0.5)
    noisy = image_key(Record(tmp_path / "b.png", (), image_id=2, split="val"), noise)
    assert noisy != clean  # noise is drawn per image id, so the id joins the key
    assert image_key(Record(tmp_path / "b.png", (), image_id=3, split="val"), noise) != noisy
    (tmp_path / "b.png").write_bytes(b"abd")
    assert image_key(Record(tmp_path / "b.png", (), image_id=2, split="val"), None) != clean

    assert text_model_key(load_text_model(tiny_text_model, 64)) == text_model_key(
        load_text_model(tiny_text_model, 64)
    )
    assert text_model_key(load_text_model(tiny_text_model, 64)) != text_model_key(
        load_text_model(tiny_text_model, 16)
    )


# --------------------------------------------------------------------------- caption features


class Stopped(Exception):
    """Stands for whatever stops a run (Ctrl-C, an out-of-memory error)."""


class CountingEncoder:
    """Wraps a backbone's ``encode``: counts captions and can fail after ``fail_after`` calls."""

    def __init__(self, encode: Callable, fail_after: int | None = None) -> None:
        self.real, self.fail_after = encode, fail_after
        self.captions: list[str] = []
        self.calls = 0

    def __call__(self, texts: list[str], **kwargs: object) -> torch.Tensor:
        if self.fail_after is not None and self.calls == self.fail_after:
            raise Stopped
        self.calls += 1
        self.captions += texts
        return self.real(texts, **kwargs)


@pytest.mark.slow
def test_caption_features_do_not_depend_on_their_batch(tiny_text_model: str) -> None:
    """A caption's row is the same alone, among 80 others, or among other lengths (exactly)."""
    backbone = load_text_model(tiny_text_model, 64)
    captions = some_captions(80)
    together = caption_features(backbone, captions, None, progress=False)
    alone = torch.cat([caption_features(backbone, [c], None, progress=False) for c in captions])
    assert torch.equal(together, alone)
    reordered = caption_features(backbone, captions[::-1], None, progress=False)
    assert torch.equal(reordered, together.flip(0))
    # What the tower computes in a plain forward, up to float rounding.
    direct = backbone.encode(captions, convert_to_tensor=True)
    assert torch.allclose(together, direct, atol=1e-5)


def test_an_interrupted_caption_extraction_resumes_with_the_same_features(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frozen_features, "TEXT_CHUNK", 8)
    monkeypatch.setattr(frozen_features, "TEXT_BATCH", 8)
    backbone = load_text_model(tiny_text_model, 64)
    captions = some_captions(60)
    uninterrupted = caption_features(backbone, captions, FeatureCache(tmp_path / "a"), False)

    cache = FeatureCache(tmp_path / "b")
    real = backbone.encode
    failing = CountingEncoder(real, fail_after=12)
    monkeypatch.setattr(backbone, "encode", failing)
    with pytest.raises(Stopped):
        caption_features(backbone, captions, cache, progress=False)
    key = text_model_key(backbone)
    stored = cache.read_rows("text", key, {frozen_features.caption_key(c) for c in captions})
    # The chunks finished before the interruption are kept (at least 8 captions each).
    assert 8 <= len(stored) <= len(set(failing.captions)) < len(captions)

    counting = CountingEncoder(real)
    monkeypatch.setattr(backbone, "encode", counting)
    resumed = caption_features(backbone, captions, cache, progress=False)
    assert len(set(counting.captions)) == len(captions) - len(stored)
    assert torch.equal(resumed, uninterrupted)


# --------------------------------------------------------------------------- data module


def _data(tmp_path: Path, **settings: object) -> AlignmentDataModule:
    return AlignmentDataModule(
        generated=GeneratedConfig(num_train=32, num_val=8, num_test=8, image_size=32),
        cache_dir=str(tmp_path),
        batch_size=8,
        **settings,
    )


def _fit(module: L.LightningModule, data: AlignmentDataModule, root: Path) -> None:
    quiet_trainer(max_epochs=1, default_root_dir=root).fit(module, data)


class Counted:
    """Wraps a module-level encoder of ``frozen_features`` to record what it is asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images: list[Path] = []
        self.captions: list[str] = []
        real_images, real_texts = frozen_features.encode_images, frozen_features.encode_texts

        def images(tower: torch.nn.Module, records: list[Record], *args: object, **kwargs: object):
            self.images += [r.image_path for r in records]
            return real_images(tower, records, *args, **kwargs)  # type: ignore[arg-type]

        def texts(backbone: torch.nn.Module, captions: list[str]):
            self.captions += list(captions)
            return real_texts(backbone, captions)

        monkeypatch.setattr(frozen_features, "encode_images", images)
        monkeypatch.setattr(frozen_features, "encode_texts", texts)


@pytest.mark.slow
def test_frozen_towers_train_from_cached_features(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tiny_module(tiny_text_model, image={"freeze": True}, text={"freeze": True})
    data = _data(tmp_path)
    _fit(module, data, tmp_path)
    kinds = {p.parent.parent.name for p in (tmp_path / "features").rglob("chunk-*.pt")}
    assert kinds == {"image", "text"}

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

    # A second run reuses every row without encoding anything.
    counted = Counted(monkeypatch)
    _fit(module, _data(tmp_path), tmp_path)
    assert counted.images == [] and counted.captions == []

    # A changed image file gets new features (and only that image).
    Image.new("RGB", (32, 32), (0, 0, 0)).save(record.image_path)
    _fit(module, _data(tmp_path), tmp_path)
    assert counted.images == [record.image_path] and counted.captions == []


@pytest.mark.slow
def test_a_run_extracts_only_what_it_uses(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tiny_module(tiny_text_model, image={"freeze": True}, text={"freeze": True})
    counted = Counted(monkeypatch)
    small = _data(tmp_path, train_images=16)
    _fit(module, small, tmp_path)
    used = small.splits["train"] + small.splits["val"]  # no test split in fit
    assert sorted(counted.images) == sorted(r.image_path for r in used)
    assert sorted(counted.captions) == sorted({c for r in used for c in r.captions})

    counted.images.clear()
    counted.captions.clear()
    full = _data(tmp_path)
    _fit(module, full, tmp_path)
    added = [r for r in full.splits["train"] if r not in small.splits["train"]]
    assert len(added) == 16
    assert sorted(counted.images) == sorted(r.image_path for r in added)
    seen = {c for r in used for c in r.captions}
    assert sorted(counted.captions) == sorted({c for r in added for c in r.captions} - seen)


def _ddp_extraction(rank: int, world: int, folder: str, text_model: str) -> None:
    """Rank 0 extracts, rank 1 reads; each reports how many images it encoded and its features."""
    encoded: list[int] = []
    real = frozen_features.encode_images

    def counting(tower: torch.nn.Module, records: list[Record], *args: object, **kwargs: object):
        encoded.append(len(records))
        return real(tower, records, *args, **kwargs)

    frozen_features.encode_images = counting
    module = tiny_module(text_model, image={"freeze": True})
    records = [r for r in _records(Path(folder)) if r.split == "train"]
    features = compute_frozen_features(
        model_inputs(module),
        records,
        FeatureCache(folder),
        progress=False,
        barrier=dist.barrier,
        is_writer=rank == 0,
    )
    stacked = torch.stack([features.image[r.image_id] for r in records])
    torch.save({"encoded": encoded, "features": stacked}, Path(folder) / f"rank{rank}.pt")


def _records(cache_dir: Path) -> list[Record]:
    from adaptalign.datamodules.formats import read_dataset

    config = GeneratedConfig(num_train=16, num_val=4, num_test=4, image_size=32)
    return read_dataset(str(g.generate_dataset(config, cache_dir, progress=False)), "karpathy")


@pytest.mark.ddp
def test_under_ddp_the_first_process_extracts_and_the_others_read(
    tiny_text_model: str, tmp_path: Path
) -> None:
    _records(tmp_path)  # generated before the processes start
    run_distributed(_ddp_extraction, 2, tmp_path, str(tmp_path), tiny_text_model)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["encoded"] == [16] and ranks[1]["encoded"] == []
    assert torch.equal(ranks[0]["features"], ranks[1]["features"])
