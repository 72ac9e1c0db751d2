"""Records written as shards read back as the same records; shards are whole or absent."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.records import Record
from adaptalign.datamodules.shard_files import expand_shards, read_samples
from adaptalign.datamodules.shard_index import index_shards, shard_records
from adaptalign.datamodules.shard_writer import write_shards

FORMATS = ("PNG", "JPEG", "BMP")


def make_records(folder: Path, count: int) -> list[Record]:
    """Tiny images in turn PNG, JPEG and BMP, with one to three captions and some objects."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        form = FORMATS[i % len(FORMATS)]
        path = folder / f"image{i}.{form.lower()}"
        Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).save(path, format=form)
        captions = tuple(f"caption {j} of image {i}" for j in range(1 + i % 3))
        objects = ("dog", "ball")[: i % 3]
        records.append(Record(path, captions, image_id=100 + i, split="test", objects=objects))
    return records


def test_written_shards_index_back_to_the_same_captions_objects_and_order(
    tmp_path: Path,
) -> None:
    records = make_records(tmp_path, 5)
    paths = write_shards(records, tmp_path / "shards", "test", shard_size=2, progress=False)
    assert [p.name for p in paths] == ["test-000000.tar", "test-000001.tar", "test-000002.tar"]

    urls = expand_shards(str(tmp_path / "shards" / "test-{000000..000002}.tar"), "shards")
    indexes = index_shards(urls, tmp_path / "cache", progress=False)
    back = shard_records(indexes, "test")
    assert [(r.captions, r.objects) for r in back] == [(r.captions, r.objects) for r in records]
    assert [r.key for r in back] == [f"{i:09d}" for i in range(5)]
    assert [r.image_id for r in back] == list(range(5))
    assert [r.shard for r in back] == [urls[0], urls[0], urls[1], urls[1], urls[2]]


def test_images_keep_their_bytes_or_their_pixels(tmp_path: Path) -> None:
    records = make_records(tmp_path, 3)
    (path,) = write_shards(records, tmp_path / "shards", "s", shard_size=3, progress=False)
    samples = dict(read_samples(str(path)))
    png, jpeg, bmp = (samples[f"{i:09d}"] for i in range(3))
    assert png["png"] == records[0].image_path.read_bytes()
    assert jpeg["jpg"] == records[1].image_path.read_bytes()
    stored = np.asarray(Image.open(io.BytesIO(bmp["png"])))
    assert np.array_equal(stored, np.asarray(Image.open(records[2].image_path)))
    assert bmp["txt"] == b"caption 0 of image 2"
    assert json.loads(bmp["json"]) == {
        "key": "000000002",
        "caption": "caption 0 of image 2",
        "captions": ["caption 0 of image 2", "caption 1 of image 2", "caption 2 of image 2"],
        "objects": ["dog", "ball"],
    }


def test_an_existing_set_is_refused_unless_overwritten(tmp_path: Path) -> None:
    records = make_records(tmp_path, 3)
    folder = tmp_path / "shards"
    write_shards(records, folder, "s", shard_size=1, progress=False)
    with pytest.raises(ConfigurationError, match=f"^{folder}: already holds 3 shards"):
        write_shards(records, folder, "s", shard_size=1, progress=False)
    write_shards(records[:1], folder, "other", shard_size=1, progress=False)  # another set

    paths = write_shards(records, folder, "s", shard_size=2, progress=False, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [
        "other-000000.tar",
        "s-000000.tar",
        "s-000001.tar",
    ]
    assert [len(list(read_samples(str(p)))) for p in paths] == [2, 1]


def test_a_writer_stopped_mid_shard_leaves_no_shard_under_its_final_name(tmp_path: Path) -> None:
    records = make_records(tmp_path, 5)
    records[3].image_path.unlink()  # the second shard fails at its second record
    folder = tmp_path / "shards"
    with pytest.raises(DatasetFormatError, match=r"image3\.png: cannot read the image"):
        write_shards(records, folder, "s", shard_size=2, progress=False)
    assert [p.name for p in folder.iterdir()] == ["s-000000.tar"]
    assert len(list(read_samples(str(folder / "s-000000.tar")))) == 2
