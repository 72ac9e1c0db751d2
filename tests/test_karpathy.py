"""The Karpathy split JSON reader and writer."""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adaptalign.common.errors import DatasetFormatError
from adaptalign.datamodules.karpathy import read_karpathy, write_karpathy
from adaptalign.datamodules.records import Record


def sentence(raw: str, sentid: int = 0) -> dict:
    return {"raw": raw, "tokens": raw.lower().split(), "sentid": sentid}


def flickr_like() -> dict:
    """Three images in the Flickr layout: no filepath, no ids, one 'restval' image."""
    return {
        "dataset": "flickr8k",
        "images": [
            {"filename": "a.jpg", "split": "train", "sentences": [sentence("  A dog runs. ")]},
            {
                "filename": "b.jpg",
                "split": "restval",
                "sentences": [sentence("Two cats."), sentence("Cats on a mat.", 2)],
            },
            {"filename": "c.jpg", "split": "test", "sentences": [sentence("A bird.")]},
        ],
    }


def write(tmp_path: Path, content: Any, name: str = "dataset_test.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_reads_flickr_layout(tmp_path: Path) -> None:
    records = read_karpathy(write(tmp_path, flickr_like()))
    root = tmp_path.resolve()
    assert records == [
        Record(root / "a.jpg", ("A dog runs.",), 0, "train"),
        Record(root / "b.jpg", ("Two cats.", "Cats on a mat."), 1, "train"),
        Record(root / "c.jpg", ("A bird.",), 2, "test"),
    ]
    assert all(r.image_path.is_absolute() for r in records)


def test_filepath_ids_and_objects_in_coco_layout(tmp_path: Path) -> None:
    data = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_000000000042.jpg",
                "split": "val",
                "imgid": 7,
                "cocoid": 42,
                "sentences": [sentence("A plate of food.")],
                "objects": [{"shape": "plate"}, {"shape": "fork"}, {"shape": "plate"}],
            },
            {
                "filepath": "train2014",
                "filename": "x.jpg",
                "split": "train",
                "cocoid": 99,
                "sentences": [sentence("A tree.")],
            },
        ],
    }
    path = write(tmp_path, data)
    first, second = read_karpathy(path)
    assert first.image_path == tmp_path.resolve() / "val2014" / "COCO_val2014_000000000042.jpg"
    assert first.image_id == 7  # imgid wins over cocoid
    assert first.objects == ("plate", "fork")  # in order, repeats dropped
    assert second.image_id == 99  # cocoid when there is no imgid
    assert second.objects == ()

    elsewhere = tmp_path / "images"
    (first_again, _) = read_karpathy(path, image_root=elsewhere)
    assert first_again.image_path == elsewhere.resolve() / "val2014" / first.image_path.name


def test_image_files_are_not_required(tmp_path: Path) -> None:
    records = read_karpathy(write(tmp_path, flickr_like()))
    assert not any(r.image_path.exists() for r in records)


def mutate(change: Callable[[dict], None]) -> dict:
    data = copy.deepcopy(flickr_like())
    change(data)
    return data


BAD_FILES: dict[str, tuple[Any, str]] = {
    "not json": ('{"images": [', r"not valid JSON at line 1"),
    "top level list": ("[]", r"top level is a JSON list; expected an object"),
    "no images": ({"dataset": "x"}, r"top-level field 'images' is missing"),
    "images not a list": ({"images": {}}, r"top-level field 'images' is a dict; expected a list"),
    "entry not an object": (mutate(lambda d: d["images"].append("c.jpg")), r"images\[3\] is a str"),
    "no filename": (
        mutate(lambda d: d["images"][1].pop("filename")),
        r"images\[1\] field 'filename': missing",
    ),
    "empty filename": (
        mutate(lambda d: d["images"][2].update(filename="")),
        r"images\[2\] field 'filename': got ''; expected a non-empty string",
    ),
    "no sentences": (
        mutate(lambda d: d["images"][2].pop("sentences")),
        r"images\[2\] field 'sentences': missing",
    ),
    "no split": (mutate(lambda d: d["images"][0].pop("split")), r"images\[0\] field 'split'"),
    "unknown split": (
        mutate(lambda d: d["images"][1].update(split="dev")),
        r"images\[1\] field 'split': got 'dev'; expected one of train, restval, val, test",
    ),
    "empty sentence list": (
        mutate(lambda d: d["images"][0].update(sentences=[])),
        r"images\[0\] field 'sentences': got \[\]; expected a non-empty list",
    ),
    "empty caption": (
        mutate(lambda d: d["images"][1]["sentences"].append(sentence("   ", 3))),
        r"images\[1\] field 'sentences\[2\]\.raw': got '   '; expected a non-empty caption",
    ),
    "caption without raw": (
        mutate(lambda d: d["images"][2]["sentences"][0].pop("raw")),
        r"images\[2\] field 'sentences\[0\]\.raw': missing",
    ),
    "duplicate imgid": (
        mutate(lambda d: [im.update(imgid=5) for im in d["images"][::2]]),
        r"images\[2\] field 'imgid': id 5 is already used by images\[0\]",
    ),
    "explicit id clashing with an index id": (
        mutate(lambda d: d["images"][2].update(cocoid=0)),
        r"images\[2\] field 'cocoid': id 0 is already used by images\[0\]",
    ),
    "non-integer id": (
        mutate(lambda d: d["images"][1].update(imgid="1")),
        r"images\[1\] field 'imgid': got '1'; expected an integer",
    ),
    "object without shape": (
        mutate(lambda d: d["images"][0].update(objects=[{"shape": "dog"}, {"colour": "red"}])),
        r"images\[0\] field 'objects\[1\]\.shape': missing",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_input_names_file_position_and_field(case: str, tmp_path: Path) -> None:
    content, message = BAD_FILES[case]
    path = write(tmp_path, content)
    with pytest.raises(DatasetFormatError, match=re.escape(str(path)) + ": " + message):
        read_karpathy(path)


def test_missing_file_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(DatasetFormatError, match=re.escape(str(path))):
        read_karpathy(path)
    assert issubclass(DatasetFormatError, ValueError)


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    images = flickr_like()["images"]
    write_karpathy(path, images, "mine", extra={"config": {"seed": 3}})
    top = json.loads(path.read_text())
    assert top == {"dataset": "mine", "images": images, "config": {"seed": 3}}
    assert [r.captions for r in read_karpathy(path)] == [
        ("A dog runs.",),
        ("Two cats.", "Cats on a mat."),
        ("A bird.",),
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.json"
    write_karpathy(path, [], "old")
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_karpathy(path, [{"filename": object()}], "new")  # not serialisable

    def interrupted(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_karpathy(path, flickr_like()["images"], "new")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
