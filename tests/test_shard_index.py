"""The index pass: captions and objects per shard, bad samples left out and named, the cache."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from webdataset import TarWriter

from adaptalign.common.errors import DatasetFormatError
from adaptalign.datamodules import shard_index
from adaptalign.datamodules.shard_index import (
    NO_CAPTION,
    NO_IMAGE,
    ShardSample,
    index_shard,
    index_shards,
    shard_records,
)

JPEG = b"\xff\xd8\xff not decoded by the index"


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> str:
    """A shard holding ``samples`` (``{"__key__": ..., EXT: bytes}``), members in that order."""
    with TarWriter(str(path), encoder=False, mtime=0) as tar:
        for sample in samples:
            tar.write(sample)
    return str(path)


def pair(key: str, text: str, **metadata: object) -> dict[str, bytes]:
    """A sample with an image, ``text`` as KEY.txt and ``metadata`` (if any) as KEY.json."""
    sample = {"__key__": key, "jpg": JPEG, "txt": text.encode()}
    if metadata:
        sample["json"] = json.dumps(metadata).encode()
    return sample


def test_captions_come_from_the_json_list_then_the_txt_then_the_json_field(
    tmp_path: Path,
) -> None:
    shard = write_tar(
        tmp_path / "a.tar",
        [
            pair("a", "first", captions=["first", " second "], objects=["dog", "ball"]),
            pair("b", "  from the txt \n", caption="from the json", captions=[]),
            pair("c", " ", caption="json, the txt is blank"),
            {"__key__": "d", "png": b"", "json": json.dumps({"caption": "json only"}).encode()},
        ],
    )
    assert index_shard(shard).samples == [
        ShardSample("a", ("first", "second"), ("dog", "ball")),
        ShardSample("b", ("from the txt",)),
        ShardSample("c", ("json, the txt is blank",)),
        ShardSample("d", ("json only",)),
    ]


def test_bad_samples_are_left_out_with_their_key_and_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shard = write_tar(
        tmp_path / "a.tar",
        [
            pair("0", "kept"),
            {"__key__": "1", "jpg": JPEG},
            {"__key__": "2", "txt": b"a caption without its image"},
            pair("3", "   "),
            {"__key__": "4", "jpg": JPEG, "txt": b"x", "json": b"{not json"},
            pair("5", "x", objects="dog"),
            pair("6", "also kept"),
        ],
    )
    with caplog.at_level(logging.WARNING):
        (index,) = index_shards([shard], tmp_path / "cache", progress=False)
    assert [sample.key for sample in index.samples] == ["0", "6"]
    assert [key for key, _ in index.bad] == ["1", "2", "3", "4", "5"]
    reasons = dict(index.bad)
    assert reasons["1"] == reasons["3"] == NO_CAPTION
    assert reasons["2"] == NO_IMAGE
    assert reasons["4"].startswith("KEY.json is not valid JSON")
    assert reasons["5"] == "'objects' in KEY.json is not a list of strings"
    (line,) = [r.getMessage() for r in caplog.records if r.name == shard_index.__name__]
    assert "shards 1, images 2, captions 2; 5 bad samples left out" in line
    assert f"{shard}/1: {NO_CAPTION}; {shard}/2: {NO_IMAGE}" in line


def test_a_key_repeated_in_a_shard_is_refused_naming_shard_and_key(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "a.tar", [pair("7", "one"), pair("8", "two"), pair("7", "again")])
    with pytest.raises(DatasetFormatError, match=f"^{shard}: key '7' appears twice"):
        index_shards([shard], tmp_path / "cache", progress=False)


def test_the_cache_is_reused_and_renewed_when_the_shard_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = write_tar(tmp_path / "a.tar", [pair("a", "before")])
    cache = tmp_path / "cache"
    first = index_shards([shard], cache, progress=False)
    assert [path.parent.name for path in cache.rglob("*.json")] == ["shard-index"]

    def no_reading(*args: object) -> None:
        raise AssertionError("the shard was read again")

    with monkeypatch.context() as patch:
        patch.setattr(shard_index, "read_samples", no_reading)
        assert index_shards([shard], cache, progress=False) == first

    write_tar(tmp_path / "a.tar", [pair("a", "after"), pair("b", "new")])
    os.utime(shard, ns=(0, 10**18))  # a new time even where the clock is coarse
    (again,) = index_shards([shard], cache, progress=False)
    assert [s.captions for s in again.samples] == [("after",), ("new",)]


def test_records_are_numbered_over_all_shards_in_order(tmp_path: Path) -> None:
    shards = [
        write_tar(tmp_path / "a.tar", [pair("x", "a x"), pair("y", "a y", objects=["cat"])]),
        write_tar(tmp_path / "b.tar", [pair("x", "b x")]),
    ]
    records = shard_records(index_shards(shards, tmp_path / "cache", progress=False), "train", 10)
    assert [(r.image_id, r.shard, r.key, r.captions) for r in records] == [
        (10, shards[0], "x", ("a x",)),
        (11, shards[0], "y", ("a y",)),
        (12, shards[1], "x", ("b x",)),
    ]
    assert records[1].objects == ("cat",)
    assert {r.split for r in records} == {"train"}
    assert records[2].image_path == Path(shards[1]) / "x"
