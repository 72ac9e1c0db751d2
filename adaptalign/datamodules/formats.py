"""Which reader a dataset file needs, told from its name and first bytes, and one call to read it.

Detection only peeks, so choosing the reader of a large JSON does not parse it twice; a file it
cannot place is an error asking for ``format`` rather than a guess.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.coco import read_coco_captions
from adaptalign.datamodules.csv_captions import REQUIRED_COLUMNS, header_columns, read_caption_csv
from adaptalign.datamodules.flickr import read_flickr8k, read_flickr30k_tokens
from adaptalign.datamodules.karpathy import read_karpathy
from adaptalign.datamodules.records import Record

FORMATS = ("karpathy", "flickr8k", "flickr30k", "csv", "coco")
FIXED_SPLITS = ("karpathy", "flickr8k")  # formats whose files define the split
PEEK_BYTES = 1 << 16

_KARPATHY_KEY = re.compile(r'"sentences"\s*:')
_COCO_KEY = re.compile(r'"(annotations|file_name)"\s*:')
_TOKEN_LINE = re.compile(r"[^\t]+#[0-9]+\t")
_DESCRIPTIONS = (
    "karpathy (.json whose images have 'sentences'), flickr8k (*.token.txt), "
    "flickr30k (results_20130124.token, *.token), csv (.csv/.txt with an 'image,caption' "
    "header), coco (captions_*.json with 'annotations')"
)


def _peek(path: Path) -> tuple[str, bool]:
    """The first bytes as text, and whether they are the whole file."""
    try:
        with path.open("rb") as handle:
            head = handle.read(PEEK_BYTES + 1)
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot read the file ({exc})") from exc
    whole = len(head) <= PEEK_BYTES
    return head[:PEEK_BYTES].decode("utf-8", errors="replace").removeprefix("\ufeff"), whole


def _json_format(path: Path, head: str, whole: bool) -> str | None:
    if _KARPATHY_KEY.search(head):
        return "karpathy"
    if _COCO_KEY.search(head):
        return "coco"
    if whole:
        return None
    try:  # the telling keys lie beyond the peek: parse once to look at the structure
        top: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(top, dict):
        return None
    if "annotations" in top:
        return "coco"
    images = top.get("images")
    if isinstance(images, list) and images and isinstance(images[0], dict):
        return "karpathy" if "sentences" in images[0] else None
    return None


def _text_format(head: str) -> str | None:
    lines = [line for line in head.splitlines() if line.strip()]
    if not lines:
        return None
    header = next(csv.reader([lines[0]]), [])
    if all(column in header_columns(header) for column in REQUIRED_COLUMNS):
        return "csv"
    if _TOKEN_LINE.match(lines[0]):
        return "flickr8k"
    return None


def detect_format(path: str | Path) -> str:
    """The format of an annotation file, one of :data:`FORMATS`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetFormatError(f"{path}: no such file; expected a dataset annotation file")
    name = path.name.lower()
    found: str | None = None
    if name.endswith(".token.txt"):
        found = "flickr8k"
    elif name.endswith(".token"):
        found = "flickr30k"
    elif name.endswith(".json"):
        found = _json_format(path, *_peek(path))
    elif name.endswith((".csv", ".txt")):
        found = _text_format(_peek(path)[0])
    if found is None:
        raise DatasetFormatError(
            f"{path}: cannot tell the dataset format from its name and first lines; expected one "
            f"of {_DESCRIPTIONS}; set format to one of {', '.join(FORMATS)}"
        )
    return found


def _resolve_format(paths: list[Path], format: str) -> str:
    if format != "auto" and format not in FORMATS:
        raise ConfigurationError(
            f"format={format!r}; expected 'auto' or one of {', '.join(FORMATS)}"
        )
    found = {p: detect_format(p) for p in paths} if format == "auto" else {}
    chosen = format if format != "auto" else next(iter(found.values()))
    if len(paths) > 1 and (chosen != "coco" or set(found.values()) - {"coco"}):
        listed = ", ".join(f"{p} ({found.get(p, chosen)})" for p in paths)
        raise ConfigurationError(
            f"got {len(paths)} annotation files: {listed}; expected one file, or several only for "
            "coco (its train and val caption files)"
        )
    return chosen


def read_dataset(
    path: str | Path | Sequence[str | Path],
    format: str = "auto",
    image_root: str | Path | None = None,
    val_images: int | None = None,
    test_images: int | None = None,
    split_seed: int = 0,
) -> list[Record]:
    """Records of a dataset in any of :data:`FORMATS`, detected from the file with ``"auto"``.

    ``val_images`` / ``test_images`` size the seeded split of formats without one (``None`` keeps
    each reader's default); giving them for a format whose files fix the split is an error rather
    than a silently ignored setting.
    """
    paths = (
        [Path(path).expanduser()]
        if isinstance(path, str | Path)
        else [Path(p).expanduser() for p in path]
    )
    if not paths:
        raise ConfigurationError("no annotation file given; expected a path")
    chosen = _resolve_format(paths, format)
    sizes = {
        key: value
        for key, value in (("val_images", val_images), ("test_images", test_images))
        if value is not None
    }
    if chosen in FIXED_SPLITS:
        if sizes:
            given = ", ".join(f"{key}={value}" for key, value in sizes.items())
            raise ConfigurationError(
                f"{given} given for {paths[0]}, but {chosen} files fix the split; expected None"
            )
        if chosen == "karpathy":
            return read_karpathy(paths[0], image_root)
        return read_flickr8k(paths[0], image_root)
    if chosen == "coco":
        return read_coco_captions(paths, image_root, split_seed=split_seed, **sizes)
    reader = read_flickr30k_tokens if chosen == "flickr30k" else read_caption_csv
    return reader(paths[0], image_root, split_seed=split_seed, **sizes)
