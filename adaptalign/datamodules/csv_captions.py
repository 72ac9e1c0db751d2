"""Reader for one-caption-per-row CSV files, like Kaggle's Flickr8k ``captions.txt`` + ``Images/``.

The file needs a header with ``image`` and ``caption`` columns; an optional ``split`` column
fixes the split, otherwise a seeded one is made. Parsing uses the ``csv`` module because captions
hold commas and quotes, and every bad row is an error naming the file and line.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from adaptalign.common.errors import DatasetFormatError
from adaptalign.datamodules.flickr import seeded_split, shorten
from adaptalign.datamodules.karpathy import SPLITS
from adaptalign.datamodules.records import Record

REQUIRED_COLUMNS = ("image", "caption")
IMAGE_FOLDER = "Images"


def csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Non-blank rows with the 1-based line each starts on; csv and decoding errors name it."""
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot read the file ({exc})") from exc
    with handle:
        reader = csv.reader(handle)
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                raise DatasetFormatError(
                    f"{path}: line {start}: cannot parse ({exc}); expected UTF-8 CSV rows"
                ) from exc
            if any(field.strip() for field in row):
                yield start, row


def header_columns(header: list[str]) -> dict[str, int]:
    """Position of each column by its lower-cased, stripped name."""
    return {name.strip().lower(): index for index, name in enumerate(header)}


def read_caption_csv(
    csv_file: str | Path,
    image_root: str | Path | None = None,
    val_images: int = 1000,
    test_images: int = 1000,
    split_seed: int = 0,
) -> list[Record]:
    """Records of a caption CSV, images in order of first appearance, captions in row order.

    Image names are relative to ``image_root``, by default an ``Images`` folder beside the file,
    else the file's folder. Without a ``split`` column the images get a seeded split of
    ``val_images`` and ``test_images`` (defaults match Flickr8k's 1,000 each); with one, the
    sizes are not used. Extra columns are ignored.
    """
    path = Path(csv_file).expanduser()
    rows = csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise DatasetFormatError(f"{path}: no rows; expected a header with 'image' and 'caption'")
    header_line, header = first
    columns = header_columns(header)
    lacking = [name for name in REQUIRED_COLUMNS if name not in columns]
    if lacking:
        raise DatasetFormatError(
            f"{path}: line {header_line}: header {shorten(','.join(header))!r} lacks "
            f"{', '.join(repr(c) for c in lacking)}; expected a header with 'image' and 'caption' "
            "columns (and optionally 'split')"
        )
    has_split = "split" in columns
    captions: dict[str, list[str]] = {}
    given: dict[str, tuple[str, int]] = {}  # image -> (split, line that gave it)
    for number, row in rows:
        where = f"{path}: line {number}"
        if len(row) != len(header):
            raise DatasetFormatError(
                f"{where}: got {len(row)} fields; expected {len(header)} like the header "
                "(quote captions that contain commas)"
            )
        name = row[columns["image"]].strip()
        if not name:
            raise DatasetFormatError(f"{where} column 'image': got ''; expected an image file name")
        caption = row[columns["caption"]].strip()
        if not caption:
            raise DatasetFormatError(f"{where} column 'caption': got ''; expected a caption")
        if has_split:
            value = row[columns["split"]].strip()
            if value not in SPLITS:
                raise DatasetFormatError(
                    f"{where} column 'split': got {shorten(value)!r}; "
                    f"expected one of {', '.join(SPLITS)}"
                )
            split, earlier = given.setdefault(name, (SPLITS[value], number))
            if split != SPLITS[value]:
                raise DatasetFormatError(
                    f"{where} column 'split': got {value!r} for {name!r}, which line {earlier} "
                    f"puts in {split!r}; expected one split per image"
                )
        captions.setdefault(name, []).append(caption)
    if has_split:
        splits = {name: split for name, (split, _) in given.items()}
    else:
        splits = seeded_split(list(captions), val_images, test_images, split_seed, str(path))
    root = Path(image_root).expanduser() if image_root is not None else path.parent / IMAGE_FOLDER
    if image_root is None and not root.is_dir():
        root = path.parent
    root = root.resolve()
    return [
        Record(image_path=root / name, captions=tuple(texts), image_id=index, split=splits[name])
        for index, (name, texts) in enumerate(captions.items())
    ]
