"""Readers of the Flickr8k, Flickr30k, CSV and COCO layouts, format detection and image checks."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules import formats, image_check
from adaptalign.datamodules.coco import read_coco_captions
from adaptalign.datamodules.csv_captions import read_caption_csv
from adaptalign.datamodules.flickr import read_flickr8k, read_flickr30k_tokens
from adaptalign.datamodules.formats import FORMATS, detect_format, read_dataset
from adaptalign.datamodules.image_check import check_images
from adaptalign.datamodules.karpathy import write_karpathy
from adaptalign.datamodules.records import Record


def write_lines(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_json(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def write_image(path: Path, seed: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def by_split(records: list[Record]) -> dict[str, set[str]]:
    return {
        s: {r.image_path.name for r in records if r.split == s} for s in ("train", "val", "test")
    }


def at(path: Path, line: int) -> str:
    """Pattern for an error naming ``path`` and ``line``."""
    return re.escape(f"{path.name}: line {line}")


# ----------------------------------------------------------------------------- Flickr8k


TOKENS_8K = (
    "a.jpg#0\t A dog runs . ",
    "b.jpg#0\tTwo cats , one mat .",
    "a.jpg#1\tA dog .",
    "c.jpg#0\tA bird .",
    "d.jpg#0\tA car .",
    "e.jpg#0\tA tree .",
    "b.jpg#1\tCats .",
)


def flickr8k(tmp_path: Path, folder: str = "Flickr8k_Dataset", beside_token: bool = False) -> Path:
    """The original layout: Flickr8k_text/ with token file and lists, images beside that folder."""
    text = tmp_path / "Flickr8k_text"
    token = write_lines(text / "Flickr8k.token.txt", *TOKENS_8K)
    write_lines(text / "Flickr_8k.trainImages.txt", "b.jpg", "a.jpg")
    write_lines(text / "Flickr_8k.devImages.txt", "c.jpg")
    write_lines(text / "Flickr_8k.testImages.txt", "d.jpg")
    ((text if beside_token else tmp_path) / folder).mkdir()
    return token


def test_flickr8k_records_and_left_out_images(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    records = read_flickr8k(flickr8k(tmp_path))
    root = (tmp_path / "Flickr8k_Dataset").resolve()
    assert records == [
        Record(root / "a.jpg", ("A dog runs .", "A dog ."), 0, "train"),
        Record(root / "b.jpg", ("Two cats , one mat .", "Cats ."), 1, "train"),
        Record(root / "c.jpg", ("A bird .",), 2, "val"),
        Record(root / "d.jpg", ("A car .",), 3, "test"),
    ]
    assert "1 of 5 captioned images are in no split list" in caplog.text
    assert "e.jpg" in caplog.text


def test_flickr8k_absent_test_list_is_an_empty_split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    token = flickr8k(tmp_path)
    (token.parent / "Flickr_8k.testImages.txt").unlink()
    assert by_split(read_flickr8k(token)) == {
        "train": {"a.jpg", "b.jpg"},
        "val": {"c.jpg"},
        "test": set(),
    }
    assert "Flickr_8k.testImages.txt not found; the test split is empty" in caplog.text
    assert "2 of 5 captioned images" in caplog.text


@pytest.mark.parametrize("folder", ["Flicker8k_Dataset", "Flickr8k_Dataset"])
@pytest.mark.parametrize("beside_token", [False, True])
def test_flickr8k_finds_image_folder(tmp_path: Path, folder: str, beside_token: bool) -> None:
    records = read_flickr8k(flickr8k(tmp_path, folder, beside_token))
    base = tmp_path / "Flickr8k_text" if beside_token else tmp_path
    assert records[0].image_path == (base / folder / "a.jpg").resolve()
    assert all(r.image_path.is_absolute() for r in records)


def test_flickr8k_image_root_and_split_files_override(tmp_path: Path) -> None:
    token = flickr8k(tmp_path)
    other = write_lines(tmp_path / "lists" / "mine.txt", "e.jpg")
    records = read_flickr8k(
        token, image_root=tmp_path / "pics", split_files={"train": other, "test": None}
    )
    assert by_split(records) == {"train": {"e.jpg"}, "val": {"c.jpg"}, "test": set()}
    assert records[-1].image_path == (tmp_path / "pics" / "e.jpg").resolve()


def test_flickr8k_without_image_folder_or_lists(tmp_path: Path) -> None:
    token = flickr8k(tmp_path)
    (tmp_path / "Flickr8k_Dataset").rmdir()
    with pytest.raises(DatasetFormatError, match=r"no image folder found.*image_root"):
        read_flickr8k(token)
    for name in ("trainImages", "devImages", "testImages"):
        (token.parent / f"Flickr_8k.{name}.txt").unlink()
    with pytest.raises(DatasetFormatError, match="none of the split lists was found"):
        read_flickr8k(token, image_root=tmp_path)


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (("b.jpg", "zzz.jpg"), "got image 'zzz.jpg', which has no caption"),
        (("b.jpg", "b.jpg"), "got image 'b.jpg' again"),
    ],
)
def test_flickr8k_bad_split_list(tmp_path: Path, lines: tuple[str, ...], problem: str) -> None:
    token = flickr8k(tmp_path)
    train = write_lines(token.parent / "Flickr_8k.trainImages.txt", *lines)
    with pytest.raises(DatasetFormatError, match=at(train, 2) + ".*" + re.escape(problem)):
        read_flickr8k(token)


def test_image_in_two_split_lists_is_an_error(tmp_path: Path) -> None:
    token = flickr8k(tmp_path)
    write_lines(token.parent / "Flickr_8k.devImages.txt", "c.jpg", "a.jpg")
    with pytest.raises(
        DatasetFormatError, match=r"devImages\.txt: line 2.*trainImages\.txt line 2"
    ):
        read_flickr8k(token)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("a.jpg#2 no tab here", "(no tab); expected 'IMAGE#K<TAB>caption'"),
        ("a.jpg\tA dog .", "(no 'IMAGE#K')"),
        ("a.jpg#x\tA dog .", "caption number 'x'"),
        ("a.jpg#2\t   ", "empty caption for 'a.jpg#2'"),
        ("a.jpg#0\tA dog again .", "again (first on line 1)"),
    ],
)
@pytest.mark.parametrize("reader", [read_flickr8k, read_flickr30k_tokens])
def test_malformed_token_line(tmp_path: Path, line: str, expected: str, reader: Any) -> None:
    token = write_lines(tmp_path / "results_20130124.token", *TOKENS_8K[:2], line, *TOKENS_8K[2:])
    with pytest.raises(DatasetFormatError, match=at(token, 3) + ".*" + re.escape(expected)):
        reader(token, image_root=tmp_path)


# ----------------------------------------------------------------------------- Flickr30k


def flickr30k(tmp_path: Path, images: int = 20, reverse: bool = False) -> Path:
    names = [f"{i:04d}.jpg" for i in range(images)]
    lines = [f"{n}#{k}\t{n} caption {k}" for n in names for k in range(2)]
    token = write_lines(tmp_path / "results_20130124.token", *(lines[::-1] if reverse else lines))
    (tmp_path / "flickr30k-images").mkdir(exist_ok=True)
    return token


def test_flickr30k_seeded_split(tmp_path: Path) -> None:
    records = read_flickr30k_tokens(flickr30k(tmp_path), val_images=3, test_images=4)
    assert [r.image_id for r in records] == list(range(20))
    assert records[5].captions == ("0005.jpg caption 0", "0005.jpg caption 1")
    assert records[5].image_path == (tmp_path / "flickr30k-images" / "0005.jpg").resolve()
    splits = by_split(records)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [13, 3, 4]
    # the documented recipe: sorted names, one seeded permutation, val first, then test
    order = np.random.default_rng(0).permutation(20)
    assert splits["val"] == {f"{i:04d}.jpg" for i in order[:3]}
    assert splits["test"] == {f"{i:04d}.jpg" for i in order[3:7]}


def test_flickr30k_split_is_deterministic_and_seeded(tmp_path: Path) -> None:
    token = flickr30k(tmp_path)
    first = by_split(read_flickr30k_tokens(token, val_images=3, test_images=4, split_seed=7))
    again = by_split(read_flickr30k_tokens(token, val_images=3, test_images=4, split_seed=7))
    other = by_split(read_flickr30k_tokens(token, val_images=3, test_images=4, split_seed=8))
    reordered = tmp_path / "reordered"
    reordered.mkdir()
    shuffled = read_flickr30k_tokens(flickr30k(reordered, reverse=True), None, 3, 4, split_seed=7)
    assert first == again == by_split(shuffled)
    assert first != other
    assert not (first["val"] & first["test"])
    assert first["train"] | first["val"] | first["test"] == {f"{i:04d}.jpg" for i in range(20)}


def test_flickr30k_sizes_must_fit(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="val_images=15 \\+ test_images=6 exceed the 20"):
        read_flickr30k_tokens(flickr30k(tmp_path), val_images=15, test_images=6)
    with pytest.raises(ConfigurationError, match="val_images=-1"):
        read_flickr30k_tokens(flickr30k(tmp_path), val_images=-1)


# ----------------------------------------------------------------------------- CSV

KAGGLE = (
    "image,caption",
    'a.jpg,"A dog, running ""fast"" ."',
    "b.jpg,A cat .",
    "a.jpg,  A dog .  ",
    "c.jpg,A bird .",
    "d.jpg,A car .",
)


def test_caption_csv_kaggle_layout(tmp_path: Path) -> None:
    csv_file = write_lines(tmp_path / "captions.txt", *KAGGLE)
    (tmp_path / "Images").mkdir()
    records = read_caption_csv(csv_file, val_images=1, test_images=1)
    root = (tmp_path / "Images").resolve()
    assert [(r.image_path, r.captions, r.image_id) for r in records] == [
        (root / "a.jpg", ('A dog, running "fast" .', "A dog ."), 0),
        (root / "b.jpg", ("A cat .",), 1),
        (root / "c.jpg", ("A bird .",), 2),
        (root / "d.jpg", ("A car .",), 3),
    ]
    assert [len(s) for s in by_split(records).values()] == [2, 1, 1]
    assert by_split(records) == by_split(read_caption_csv(csv_file, None, 1, 1))


def test_caption_csv_split_column_and_default_root(tmp_path: Path) -> None:
    csv_file = write_lines(
        tmp_path / "pairs.csv",
        "id,Split,caption,image",
        "1,train,A dog .,a.jpg",
        "2,restval,A cat .,b.jpg",
        "3,val,A bird .,c.jpg",
        "4,test,A car .,d.jpg",
        "5,train,Dog again .,a.jpg",
    )
    records = read_caption_csv(csv_file, val_images=0, test_images=0)
    assert by_split(records) == {"train": {"a.jpg", "b.jpg"}, "val": {"c.jpg"}, "test": {"d.jpg"}}
    assert records[0].captions == ("A dog .", "Dog again .")
    assert records[0].image_path == tmp_path.resolve() / "a.jpg"  # no Images folder


@pytest.mark.parametrize(
    ("lines", "line", "expected"),
    [
        (("img,caption", "a.jpg,A."), 1, "lacks 'image'; expected a header with 'image'"),
        (("image,caption", "a.jpg,A.", "b.jpg,A, b ."), 3, "got 3 fields; expected 2"),
        (("image,caption", "a.jpg,A.", " ,B."), 3, "column 'image': got ''"),
        (("image,caption", "a.jpg,A.", "b.jpg,  "), 3, "column 'caption': got ''"),
        (("image,caption,split", "a.jpg,A.,train", "b.jpg,B.,dev"), 3, "got 'dev'; expected"),
        (("image,caption,split", "a.jpg,A.,train", "a.jpg,B.,val"), 3, "which line 2 puts in"),
    ],
)
def test_caption_csv_errors(
    tmp_path: Path, lines: tuple[str, ...], line: int, expected: str
) -> None:
    csv_file = write_lines(tmp_path / "captions.csv", *lines)
    with pytest.raises(DatasetFormatError, match=at(csv_file, line) + ".*" + re.escape(expected)):
        read_caption_csv(csv_file, val_images=0, test_images=0)


# ----------------------------------------------------------------------------- COCO


def coco_file(subset: str, ids: range, captions: int = 2) -> dict:
    return {
        "info": {},
        "images": [{"id": i, "file_name": f"COCO_{subset}_{i:012d}.jpg"} for i in ids],
        "annotations": [
            {"id": 100 * i + k, "image_id": i, "caption": f" image {i} caption {k}\n"}
            for k in range(captions)
            for i in ids
        ],
    }


def coco(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "annotations"
    return [
        write_json(folder / "captions_train2014.json", coco_file("train2014", range(1, 3))),
        write_json(folder / "captions_val2014.json", coco_file("val2014", range(10, 20))),
    ]


def test_coco_records_and_split(tmp_path: Path) -> None:
    records = read_coco_captions(coco(tmp_path), val_images=3, test_images=2)
    assert [r.image_id for r in records] == [1, 2, *range(10, 20)]
    first = records[0]
    assert first.captions == ("image 1 caption 0", "image 1 caption 1")
    assert first.split == "train"
    assert first.image_path == tmp_path.resolve() / "train2014" / "COCO_train2014_000000000001.jpg"
    assert records[2].image_path.parent == tmp_path.resolve() / "val2014"
    val2014 = [r for r in records if r.image_id >= 10]
    assert [sum(r.split == s for r in val2014) for s in ("train", "val", "test")] == [5, 3, 2]
    again = read_coco_captions(coco(tmp_path), val_images=3, test_images=2)
    assert by_split(again) == by_split(records)
    moved = read_coco_captions(coco(tmp_path), tmp_path / "elsewhere", 3, 2)
    assert moved[-1].image_path.parent == (tmp_path / "elsewhere" / "val2014").resolve()


def test_coco_sizes_need_a_validation_file(tmp_path: Path) -> None:
    train = coco(tmp_path)[0]
    with pytest.raises(ConfigurationError, match=re.escape("expected a captions_val*.json file")):
        read_coco_captions([train])
    assert {r.split for r in read_coco_captions([train], val_images=0, test_images=0)} == {"train"}


def broken_coco(change: str) -> dict:
    data = coco_file("val2014", range(10, 12), captions=1)
    if change in ("images", "annotations"):
        del data[change]
    elif change == "unknown id":
        data["annotations"][1]["image_id"] = 99
    elif change == "empty caption":
        data["annotations"][0]["caption"] = "  "
    elif change == "uncaptioned":
        data["annotations"].pop(1)
    elif change == "file name":
        del data["images"][1]["file_name"]
    return data


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("images", "top-level field 'images' is missing"),
        ("annotations", "top-level field 'annotations' is missing"),
        ("unknown id", "annotations[1] field 'image_id': got 99; expected the id of an entry"),
        ("empty caption", "annotations[0] field 'caption': got '  '"),
        ("uncaptioned", "1 of 2 images have no caption in 'annotations', e.g. images[1]"),
        ("file name", "images[1] field 'file_name': missing"),
    ],
)
def test_coco_errors(tmp_path: Path, change: str, expected: str) -> None:
    path = write_json(tmp_path / "captions_val2014.json", broken_coco(change))
    with pytest.raises(DatasetFormatError, match=re.escape(f"{path.name}: {expected}")):
        read_coco_captions([path], val_images=1, test_images=0)


def test_coco_skipping_uncaptioned_images_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    path = write_json(tmp_path / "captions_val2014.json", broken_coco("uncaptioned"))
    records = read_coco_captions([path], None, 1, 0, skip_uncaptioned=True)
    assert [r.image_id for r in records] == [10]
    assert "left out 1 of 2 images that have no caption" in caplog.text
    assert "COCO_val2014_000000000011.jpg" in caplog.text


def test_coco_ids_unique_across_files_and_names_checked(tmp_path: Path) -> None:
    val = write_json(tmp_path / "a" / "captions_val2014.json", coco_file("val2014", range(3)))
    train = write_json(tmp_path / "a" / "captions_train2014.json", coco_file("train2014", range(3)))
    with pytest.raises(DatasetFormatError, match=r"image id 0 .* is also in"):
        read_coco_captions([val, train], val_images=1, test_images=1)
    odd = write_json(tmp_path / "captions.json", coco_file("val2014", range(3)))
    with pytest.raises(
        DatasetFormatError, match=re.escape("captions.json: cannot tell training from")
    ):
        read_coco_captions([odd])


# ----------------------------------------------------------------------------- detection


def karpathy_file(tmp_path: Path) -> Path:
    path = tmp_path / "dataset_flickr8k.json"
    image = {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "A dog ."}]}
    write_karpathy(path, [image], "flickr8k")
    return path


def sample_files(tmp_path: Path) -> dict[str, Path]:
    return {
        "karpathy": karpathy_file(tmp_path),
        "flickr8k": flickr8k(tmp_path),
        "flickr30k": flickr30k(tmp_path),
        "csv": write_lines(tmp_path / "captions.txt", *KAGGLE),
        "coco": coco(tmp_path)[1],
    }


def test_detect_each_format(tmp_path: Path) -> None:
    files = sample_files(tmp_path)
    assert {name: detect_format(path) for name, path in files.items()} == {f: f for f in FORMATS}
    assert detect_format(write_lines(tmp_path / "x.csv", "Caption,Image,split")) == "csv"
    assert detect_format(write_lines(tmp_path / "c.txt", "x.jpg#0\tA dog .")) == "flickr8k"


def test_detect_json_beyond_the_peek(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "PEEK_BYTES", 8)
    assert detect_format(karpathy_file(tmp_path)) == "karpathy"
    assert detect_format(coco(tmp_path)[0]) == "coco"


@pytest.mark.parametrize(
    ("name", "content"),
    [("notes.txt", "hello\n"), ("data.json", '{"images": []}'), ("data.bin", "x")],
)
def test_detect_unknown_format(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetFormatError, match=f"{re.escape(name)}: cannot tell") as info:
        detect_format(path)
    message = str(info.value)
    assert "set format" in message
    assert all(f in message for f in FORMATS)


def test_detect_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match=re.escape("nothing.json: no such file")):
        detect_format(tmp_path / "nothing.json")


def test_read_dataset_dispatches(tmp_path: Path) -> None:
    files = sample_files(tmp_path)
    counts = {
        name: len(read_dataset(path, val_images=1, test_images=1))
        for name, path in files.items()
        if name not in ("karpathy", "flickr8k")
    }
    assert counts == {"flickr30k": 20, "csv": 4, "coco": 10}
    assert len(read_dataset(files["karpathy"])) == 1
    assert len(read_dataset(str(files["flickr8k"]))) == 4
    assert len(read_dataset(coco(tmp_path), val_images=3, test_images=2)) == 12
    renamed = files["csv"].rename(tmp_path / "pairs.dat")
    assert len(read_dataset(renamed, format="csv", val_images=0, test_images=0)) == 4


def test_read_dataset_rejects_bad_settings(tmp_path: Path) -> None:
    files = sample_files(tmp_path)
    with pytest.raises(ConfigurationError, match="several only for coco"):
        read_dataset([files["flickr30k"], files["csv"]])
    with pytest.raises(ConfigurationError, match=r"val_images=5 given .* fix the split"):
        read_dataset(files["flickr8k"], val_images=5)
    with pytest.raises(ConfigurationError, match="format='tsv'; expected 'auto' or one of"):
        read_dataset(files["csv"], format="tsv")


# ----------------------------------------------------------------------------- image checks


def records_for(paths: list[Path]) -> list[Record]:
    return [Record(p.resolve(), ("caption",), i, "train") for i, p in enumerate(paths)]


def broken_images(tmp_path: Path) -> list[Record]:
    good = write_image(tmp_path / "good.jpg")
    truncated = write_image(tmp_path / "truncated.jpg", seed=1, size=48)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    other = tmp_path / "not_image.jpg"
    other.write_text("not an image")
    return records_for([good, truncated, other])


def test_missing_images_counted_and_listed(tmp_path: Path) -> None:
    paths = [tmp_path / f"img{i}.jpg" for i in range(8)]
    write_image(paths[3])
    with pytest.raises(
        DatasetFormatError, match=re.escape("7 of 8 image files listed in ann.json")
    ) as info:
        check_images(records_for(paths), source="ann.json")
    message = str(info.value)
    assert all(p.name in message for p in [*paths[:3], *paths[4:6]])
    assert paths[6].name not in message  # only the first five are listed


def test_truncated_and_non_images_caught_by_decoding(tmp_path: Path) -> None:
    records = broken_images(tmp_path)
    assert check_images(records) == records  # they exist; only decoding tells
    with pytest.raises(DatasetFormatError, match="2 of 3 image files cannot be decoded") as info:
        check_images(records, decode=True)
    assert "truncated.jpg (OSError: image file is truncated" in str(info.value)
    assert "not_image.jpg (UnidentifiedImageError" in str(info.value)


def test_truncation_caught_even_when_pillow_tolerates_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DatasetFormatError, match=re.escape("truncated.jpg")):
        check_images(broken_images(tmp_path), decode=True)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_skip_bad_keeps_good_images_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    records = [*broken_images(tmp_path), *records_for([tmp_path / "gone.jpg"])]
    kept = check_images(records, decode=True, skip_bad=True)
    assert [r.image_path.name for r in kept] == ["good.jpg"]
    assert "1 of 4 image files are missing, e.g." in caplog.text
    assert "2 of 4 image files cannot be decoded" in caplog.text
    assert all(n in caplog.text for n in ("gone.jpg", "truncated.jpg", "not_image.jpg"))


def test_progress_bar_for_many_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(image_check, "PROGRESS_MIN", 1)
    records = records_for([write_image(tmp_path / f"{i}.jpg", i) for i in range(2)])
    assert check_images(records, decode=True) == records
    assert "checking images" in capsys.readouterr().err
