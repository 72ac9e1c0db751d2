"""The one in-memory form every dataset format is read into, so later layers see a single shape."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptalign.common.errors import DatasetFormatError


@dataclass(frozen=True)
class Record:
    """One image with all its captions.

    ``image_path`` is resolved so records from different roots compare and hash reliably;
    ``split`` is already normalised (Karpathy's "restval" is training data); ``objects`` holds the
    ontology tags a curriculum can group by, empty when the source does not annotate them.

    A pair read from a WebDataset tar shard has no file of its own: ``shard`` is the shard's path
    or URL and ``key`` the sample's key in it, and ``image_path`` (``<shard>/<key>``) only names
    it in messages; its image is read by streaming the shard.
    """

    image_path: Path
    captions: tuple[str, ...]
    image_id: int
    split: str
    objects: tuple[str, ...] = ()
    shard: str = ""
    key: str = ""


def load_json_object(path: Path, what: str, example: str) -> dict[str, Any]:
    """A JSON file's top-level object, or an error naming the file and what it should hold."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: cannot read the file ({exc})") from exc
    return parse_json_object(text, str(path), what, example)


def parse_json_object(
    text: str,
    source: str,
    what: str,
    example: str,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> dict[str, Any]:
    """JSON text's top-level object, or an error naming ``source`` and what it should hold."""
    try:
        top = json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(
            f"{source}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
            f"expected {what}"
        ) from exc
    if not isinstance(top, dict):
        raise DatasetFormatError(
            f"{source}: top level is a JSON {type(top).__name__}; expected an object like {example}"
        )
    return top
