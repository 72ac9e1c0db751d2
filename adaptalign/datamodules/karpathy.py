"""Reading and writing the Karpathy split JSON layout (Flickr8k, Flickr30k, COCO, generated data).

The reader checks structure strictly and names the file, image index and field of the first
problem, because a silently skipped image or caption would shift retrieval metrics unnoticed.
It does not look at image files; that check is shared by every format and done later.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adaptalign.common.atomic_files import atomic_save
from adaptalign.common.checks import is_int
from adaptalign.common.errors import DatasetFormatError
from adaptalign.datamodules.records import Record, load_json_object

SPLITS: dict[str, str] = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _load_top(path: Path) -> list[Any]:
    """The ``images`` list of the file, after checking the file is a JSON object holding one."""
    top = load_json_object(path, "a Karpathy split JSON file", '{"images": [...], "dataset": ...}')
    if "images" not in top:
        raise DatasetFormatError(f"{path}: top-level field 'images' is missing; expected a list")
    images = top["images"]
    if not isinstance(images, list):
        raise DatasetFormatError(
            f"{path}: top-level field 'images' is a {type(images).__name__}; expected a list"
        )
    return images


class _ImageParser:
    """Turns one entry of ``images`` into a Record, naming the entry in every error it raises."""

    def __init__(self, path: Path, index: int, entry: Any, root: Path) -> None:
        self.path = path
        self.index = index
        self.entry = entry
        self.root = root

    def fail(self, field: str, problem: str) -> DatasetFormatError:
        return DatasetFormatError(f"{self.path}: images[{self.index}] field '{field}': {problem}")

    def require(self, field: str) -> Any:
        if field not in self.entry:
            raise self.fail(field, "missing; expected it in every image entry")
        return self.entry[field]

    def string(self, field: str, value: Any, allow_empty: bool = False) -> str:
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise self.fail(field, f"got {value!r}; expected a non-empty string")
        return value

    def parse(self) -> Record:
        if not isinstance(self.entry, dict):
            raise DatasetFormatError(
                f"{self.path}: images[{self.index}] is a {type(self.entry).__name__}; "
                "expected an object"
            )
        filename = self.string("filename", self.require("filename"))
        filepath = self.string("filepath", self.entry.get("filepath", ""), allow_empty=True)
        split = self.require("split")
        if split not in SPLITS:
            raise self.fail("split", f"got {split!r}; expected one of {', '.join(SPLITS)}")
        return Record(
            image_path=self.root / filepath / filename,
            captions=self.captions(),
            image_id=self.image_id()[0],
            split=SPLITS[split],
            objects=self.objects(),
        )

    def captions(self) -> tuple[str, ...]:
        sentences = self.require("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise self.fail("sentences", f"got {sentences!r}; expected a non-empty list")
        captions = []
        for j, sentence in enumerate(sentences):
            field = f"sentences[{j}].raw"
            if not isinstance(sentence, dict) or "raw" not in sentence:
                raise self.fail(field, "missing; expected each sentence to be an object with 'raw'")
            raw = sentence["raw"]
            if not isinstance(raw, str) or not raw.strip():
                raise self.fail(field, f"got {raw!r}; expected a non-empty caption")
            captions.append(raw.strip())
        return tuple(captions)

    def image_id(self) -> tuple[int, str]:
        """The id and the field it came from; the list index when the entry names none."""
        for field in ("imgid", "cocoid"):
            if field in self.entry:
                value = self.entry[field]
                if not is_int(value):
                    raise self.fail(field, f"got {value!r}; expected an integer image id")
                return value, field
        return self.index, "(list index)"

    def objects(self) -> tuple[str, ...]:
        objects = self.entry.get("objects", [])
        if not isinstance(objects, list):
            raise self.fail("objects", f"got {objects!r}; expected a list of objects")
        shapes: list[str] = []
        for j, item in enumerate(objects):
            field = f"objects[{j}].shape"
            if not isinstance(item, dict) or "shape" not in item:
                raise self.fail(field, "missing; expected each object to have a 'shape'")
            shape = self.string(field, item["shape"])
            if shape not in shapes:
                shapes.append(shape)
        return tuple(shapes)


def read_karpathy(path: str | Path, image_root: str | Path | None = None) -> list[Record]:
    """Records of a Karpathy split JSON, in file order.

    Image paths are ``image_root / filepath / filename``; ``image_root`` defaults to the JSON's
    folder so a dataset folder can be moved as a whole.
    """
    path = Path(path).expanduser()
    images = _load_top(path)
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    root = root.resolve()
    records: list[Record] = []
    seen: dict[int, int] = {}
    for index, entry in enumerate(images):
        parser = _ImageParser(path, index, entry, root)
        record = parser.parse()
        image_id, field = parser.image_id()
        if image_id in seen:
            raise parser.fail(
                field,
                f"id {image_id} is already used by images[{seen[image_id]}]; "
                "expected unique image ids",
            )
        seen[image_id] = index
        records.append(record)
    return records


def write_karpathy(
    path: str | Path,
    images: list[dict],
    dataset: str,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a Karpathy split JSON atomically, so readers never see a half-written file.

    ``extra`` adds top-level fields (such as the settings that produced the data). Output is
    deterministic for equal input, which keeps generated datasets byte-identical across runs.
    """
    path = Path(path)
    top: dict[str, Any] = {"dataset": dataset, "images": images, **(extra or {})}
    text = json.dumps(top, ensure_ascii=False)
    atomic_save(path, text + "\n")
