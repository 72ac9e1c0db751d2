"""The one in-memory form every dataset format is read into, so later layers see a single shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DatasetFormatError(ValueError):
    """Bad dataset input; the message names the file, the position, the field and what was expected.

    A ``ValueError`` so callers that only know "bad value" still catch it, yet distinct so the
    command line can report it as one clear line instead of a traceback.
    """


@dataclass(frozen=True)
class Record:
    """One image with all its captions.

    ``image_path`` is resolved so records from different roots compare and hash reliably;
    ``split`` is already normalised (Karpathy's "restval" is training data); ``objects`` holds the
    ontology tags a curriculum can group by, empty when the source does not annotate them.
    """

    image_path: Path
    captions: tuple[str, ...]
    image_id: int
    split: str
    objects: tuple[str, ...] = ()
