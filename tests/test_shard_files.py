"""Shard names (braces, checks) and reading a shard's samples the WebDataset way."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import pytest
from webdataset import TarWriter

from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.shard_files import expand_shards, read_samples, shard_identity

SETTING = "data.train_shards"


def write_tar(path: Path, samples: list[dict[str, bytes | str]]) -> Path:
    """A shard holding ``samples`` (``{"__key__": ..., EXT: bytes}``), members in that order."""
    with TarWriter(str(path), encoder=False, mtime=0) as tar:
        for sample in samples:
            tar.write(sample)
    return path


def touch_shards(folder: Path, count: int) -> list[Path]:
    return [write_tar(folder / f"s-{i}.tar", [{"__key__": "a", "txt": b"x"}]) for i in range(count)]


def test_braces_expand_in_the_order_written(tmp_path: Path) -> None:
    touch_shards(tmp_path, 12)
    spec = [f"{tmp_path}/s-{{10..11}}.tar", f"{tmp_path}/s-{{0..2}}.tar"]
    expected = [str(tmp_path / f"s-{i}.tar") for i in (10, 11, 0, 1, 2)]
    assert expand_shards(spec, SETTING) == expected
    assert expand_shards(f"{tmp_path}/s-{{10..11}}.tar", SETTING) == expected[:2]


def test_local_shards_come_back_absolute_and_urls_unchecked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touch_shards(tmp_path, 1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    urls = ["s-0.tar", "https://example.org/never-reached.tar", "pipe:cat nothing.tar"]
    assert expand_shards(urls, SETTING) == [str(tmp_path / "s-0.tar"), *urls[1:]]
    assert expand_shards("~/s-0.tar", SETTING) == [str(tmp_path / "s-0.tar")]


def test_a_missing_shard_is_one_line_naming_the_setting_and_the_shard(tmp_path: Path) -> None:
    touch_shards(tmp_path, 2)
    with pytest.raises(ConfigurationError) as error:
        expand_shards(f"{tmp_path}/s-{{0..4}}.tar", SETTING)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{SETTING}: shard '{tmp_path / 's-2.tar'}' does not exist")
    assert "3 of 5 shards are missing" in message


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("{a,a}.tar", "'{folder}/a.tar' is named twice"),
        (["a.tar", "./a.tar"], "'{folder}/a.tar' is named twice"),
        ([], "names no shards"),
        ("s3://bucket/a.tar", "scheme ('s3:') that webdataset cannot open"),
    ],
)
def test_shard_lists_that_cannot_be_meant_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str | list[str], expected: str
) -> None:
    write_tar(tmp_path / "a.tar", [{"__key__": "a", "txt": b"x"}])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=f"^{SETTING}: ") as error:
        expand_shards(spec, SETTING)
    assert expected.format(folder=tmp_path) in str(error.value)


def test_samples_are_grouped_by_key_in_file_order_with_only_the_wanted_members(
    tmp_path: Path,
) -> None:
    shard = write_tar(
        tmp_path / "a.tar",
        [
            {"__key__": "b/002", "jpg": b"\xff\xd8two", "txt": b"two", "json": b"{}"},
            {"__key__": "b/001", "PNG": b"one", "txt": b"one"},
            {"__key__": "b/003", "cls": b"7"},
        ],
    )
    assert list(read_samples(str(shard))) == [
        ("b/002", {"jpg": b"\xff\xd8two", "json": b"{}", "txt": b"two"}),
        ("b/001", {"png": b"one", "txt": b"one"}),
        ("b/003", {"cls": b"7"}),
    ]
    assert list(read_samples(str(shard), ["txt"])) == [
        ("b/002", {"txt": b"two"}),
        ("b/001", {"txt": b"one"}),
    ]
    assert [key for key, _ in read_samples(f"pipe:cat '{shard}'", ["cls"])] == ["b/003"]


def test_a_key_that_comes_back_later_is_refused(tmp_path: Path) -> None:
    shard = write_tar(
        tmp_path / "a.tar",
        [
            {"__key__": "1", "txt": b"a"},
            {"__key__": "2", "txt": b"b"},
            {"__key__": "1", "jpg": b""},
        ],
    )
    with pytest.raises(DatasetFormatError, match=r"a\.tar: key '1' appears twice"):
        list(read_samples(str(shard)))


@pytest.mark.parametrize("cut", [0, 100, 512 + 300, 2 * 512 + 10, 3 * 512 + 200])
def test_a_shard_cut_short_is_a_format_error_naming_it(tmp_path: Path, cut: int) -> None:
    whole = write_tar(
        tmp_path / "whole.tar",
        [{"__key__": f"{i}", "txt": b"caption", "json": b"{}"} for i in range(4)],
    )
    shard = tmp_path / "cut.tar"
    shard.write_bytes(whole.read_bytes()[:cut])
    with pytest.raises(DatasetFormatError) as error:
        list(read_samples(str(shard)))
    assert str(error.value).startswith(f"{shard}: ")
    assert "\n" not in str(error.value)


def test_a_missing_or_failing_shard_is_a_format_error_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.tar")
    with pytest.raises(DatasetFormatError, match=f"^{re.escape(missing)}: cannot open the shard"):
        list(read_samples(missing))
    with pytest.raises(DatasetFormatError, match=r"^pipe:exit 3: .*exited with status 3"):
        list(read_samples("pipe:exit 3"))


def test_the_identity_changes_with_the_file_and_not_with_its_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = write_tar(tmp_path / "a.tar", [{"__key__": "a", "txt": b"x"}])
    monkeypatch.chdir(tmp_path)
    before = shard_identity(str(shard))
    assert shard_identity("a.tar") == shard_identity(f"file://{shard}") == before
    os.utime(shard, ns=(0, 12345))
    assert shard_identity(str(shard)) != before
    assert shard_identity("https://a/x.tar") != shard_identity("https://a/y.tar")


def test_a_member_named_twice_is_refused(tmp_path: Path) -> None:
    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("1.txt", "1.jpg", "1.JPG"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DatasetFormatError, match=r"a\.tar: member '1\.JPG' appears twice"):
        list(read_samples(str(shard)))
