"""Reader for MSCOCO caption files (``captions_train2014.json``, ``captions_val2014.json``).

Training files give training images; the images of validation files are split by seed into
validation, test, and the rest for training (as Karpathy's "restval"). Structure is checked
strictly and errors name the file, list index and field, as for the Karpathy reader.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptalign.common.checks import is_int
from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.flickr import SHOWN, seeded_split, shorten
from adaptalign.datamodules.records import Record, load_json_object

log = logging.getLogger(__name__)

# The subset names the image folder; whether it is training or validation data follows from it.
_FILE_NAME = re.compile(r"captions_((train|val)\w*)\.json")


@dataclass
class CocoImage:
    """One image of a caption file, before its split is known."""

    image_id: int
    file_name: str
    subset: str
    captions: list[str]


def _subset(path: Path) -> str:
    match = _FILE_NAME.fullmatch(path.name)
    if match is None:
        raise DatasetFormatError(
            f"{path}: cannot tell training from validation data by the name; expected "
            "captions_<subset>.json with <subset> such as train2014 or val2014 (the image folder)"
        )
    return match.group(1)


def _top_list(path: Path, top: dict[str, Any], field: str, shape: str) -> list[Any]:
    if field not in top:
        raise DatasetFormatError(f"{path}: top-level field '{field}' is missing; expected {shape}")
    value = top[field]
    if not isinstance(value, list):
        raise DatasetFormatError(
            f"{path}: top-level field '{field}' is a {type(value).__name__}; expected {shape}"
        )
    return value


def _load(path: Path) -> tuple[list[Any], list[Any]]:
    """The ``images`` and ``annotations`` lists of a caption file."""
    top = load_json_object(path, "a COCO caption file", '{"images": [...], "annotations": [...]}')
    images = _top_list(path, top, "images", "a list of {id, file_name} objects")
    annotations = _top_list(path, top, "annotations", "a list of {image_id, caption} objects")
    return images, annotations


def _field(path: Path, where: str, entry: Any, field: str) -> Any:
    if not isinstance(entry, dict):
        raise DatasetFormatError(f"{path}: {where} is a {type(entry).__name__}; expected an object")
    if field not in entry:
        raise DatasetFormatError(f"{path}: {where} field '{field}': missing; expected it in each")
    return entry[field]


def _images(path: Path, entries: list[Any], subset: str) -> dict[int, CocoImage]:
    images: dict[int, CocoImage] = {}
    index_of: dict[int, int] = {}
    for index, entry in enumerate(entries):
        where = f"images[{index}]"
        image_id = _field(path, where, entry, "id")
        if not is_int(image_id):
            raise DatasetFormatError(
                f"{path}: {where} field 'id': got {image_id!r}; expected an integer image id"
            )
        if image_id in images:
            raise DatasetFormatError(
                f"{path}: {where} field 'id': got {image_id}, already used by "
                f"images[{index_of[image_id]}]; expected unique image ids"
            )
        file_name = _field(path, where, entry, "file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            raise DatasetFormatError(
                f"{path}: {where} field 'file_name': got {file_name!r}; expected a file name"
            )
        images[image_id] = CocoImage(image_id, file_name.strip(), subset, [])
        index_of[image_id] = index
    return images


def _add_captions(path: Path, entries: list[Any], images: dict[int, CocoImage]) -> None:
    for index, entry in enumerate(entries):
        where = f"annotations[{index}]"
        image_id = _field(path, where, entry, "image_id")
        if not is_int(image_id) or image_id not in images:
            raise DatasetFormatError(
                f"{path}: {where} field 'image_id': got {image_id!r}; "
                "expected the id of an entry of 'images'"
            )
        caption = _field(path, where, entry, "caption")
        if not isinstance(caption, str) or not caption.strip():
            raise DatasetFormatError(
                f"{path}: {where} field 'caption': got {shorten(repr(caption))}; "
                "expected a non-empty caption"
            )
        images[image_id].captions.append(caption.strip())


def read_caption_file(path: Path, skip_uncaptioned: bool = False) -> list[CocoImage]:
    """Images of one caption file with their captions, in the order of its ``images`` list."""
    subset = _subset(path)
    entries, annotations = _load(path)
    images = _images(path, entries, subset)
    _add_captions(path, annotations, images)
    bare = [(i, image) for i, image in enumerate(images.values()) if not image.captions]
    if bare:
        shown = ", ".join(f"images[{i}] ({image.file_name})" for i, image in bare[:SHOWN])
        if not skip_uncaptioned:
            raise DatasetFormatError(
                f"{path}: {len(bare)} of {len(images)} images have no caption in 'annotations', "
                f"e.g. {shown}; expected at least one each (skip_uncaptioned=True leaves them out)"
            )
        log.warning(
            "%s: left out %d of %d images that have no caption, e.g. %s",
            path,
            len(bare),
            len(images),
            shown,
        )
    return [image for image in images.values() if image.captions]


def read_coco_captions(
    caption_files: str | Path | Sequence[str | Path],
    image_root: str | Path | None = None,
    val_images: int = 5000,
    test_images: int = 5000,
    split_seed: int = 0,
    skip_uncaptioned: bool = False,
) -> list[Record]:
    """Records of COCO caption files, in file order; ``image_id`` is the COCO id.

    Images are ``<root>/<subset>/<file_name>`` where ``<subset>`` comes from the file name
    (``captions_val2014.json`` -> ``val2014``) and ``<root>`` is ``image_root``, by default the
    folder above the file's ``annotations`` folder. The seeded validation/test split is drawn from
    the validation files only; it is not Karpathy's list, so compare runs with equal seeds only.
    """
    paths = [caption_files] if isinstance(caption_files, str | Path) else list(caption_files)
    if not paths:
        raise ConfigurationError("caption_files is empty; expected COCO caption JSON files")
    records: list[tuple[Path, CocoImage]] = []
    source: dict[int, Path] = {}
    for path in (Path(p).expanduser() for p in paths):
        for image in read_caption_file(path, skip_uncaptioned):
            if image.image_id in source:
                raise DatasetFormatError(
                    f"{path}: image id {image.image_id} ({image.file_name}) is also in "
                    f"{source[image.image_id]}; expected each image in one file"
                )
            source[image.image_id] = path
            records.append((path, image))
    pool = [_key(image) for _, image in records if image.subset.startswith("val")]
    if not pool and val_images + test_images > 0:
        raise ConfigurationError(
            f"val_images={val_images} and test_images={test_images} are drawn from validation "
            f"files, but none is among {', '.join(str(p) for p in paths)}; expected a "
            "captions_val*.json file, or both sizes 0"
        )
    described = ", ".join(str(p) for p in paths if _subset(Path(p)).startswith("val"))
    splits = seeded_split(pool, val_images, test_images, split_seed, described)
    roots: dict[Path, Path] = {}
    for path, _ in records:
        if path not in roots:
            root = Path(image_root).expanduser() if image_root is not None else path.parent.parent
            roots[path] = root.resolve()
    return [
        Record(
            image_path=roots[path] / image.subset / image.file_name,
            captions=tuple(image.captions),
            image_id=image.image_id,
            split=splits.get(_key(image), "train"),
        )
        for path, image in records
    ]


def _key(image: CocoImage) -> str:
    """Name the seeded split sorts by; the subset keeps equal file names of two folders apart."""
    return f"{image.subset}/{image.file_name}"
