"""Checking that the images records point to exist and decode, before training starts.

A missing or broken image otherwise surfaces hours into a run, in one dataloader worker. Every
format shares this check; problems are reported together (count and first few paths), or, when
asked, left out with a warning that says how many and which, never silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageFile
from tqdm import tqdm

from adaptalign.common.errors import DatasetFormatError
from adaptalign.datamodules.records import Record

log = logging.getLogger(__name__)

SHOWN = 5  # paths quoted per problem: enough to spot a pattern, short enough to read
PROGRESS_MIN = 500  # below this decoding is quick enough to need no progress bar


def decode_error(path: Path) -> str | None:
    """Why ``path`` cannot be fully decoded, or ``None`` if it can.

    ``load()`` decodes every pixel; opening alone reads only the header, so a truncated JPEG
    would pass. Any exception counts: broken files make Pillow raise many kinds.
    """
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Truncated images raise even if the process told Pillow to tolerate them."""
    tolerant = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant


def _decode_all(paths: list[Path], workers: int | None) -> list[str | None]:
    """``decode_error`` of each path, in threads: Pillow releases the GIL while decoding."""
    workers = workers or min(8, os.cpu_count() or 1)
    with _strict_decoding(), ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(decode_error, paths)
        bar = tqdm(
            results,
            total=len(paths),
            desc="checking images",
            unit="image",
            disable=len(paths) <= PROGRESS_MIN,
        )
        return list(bar)


def _problem(what: str, bad: list[str], total: int, source: str | Path | None) -> str:
    listed = f" listed in {source}" if source is not None else ""
    return f"{len(bad)} of {total} image files{listed} {what}, e.g. {', '.join(bad[:SHOWN])}"


def check_images(
    records: Sequence[Record],
    decode: bool = False,
    skip_bad: bool = False,
    source: str | Path | None = None,
    workers: int | None = None,
) -> list[Record]:
    """The records whose image files exist (and, with ``decode``, fully decode).

    Problems raise one :class:`DatasetFormatError` giving the count and the first paths (and
    ``source``, the annotation file, when given); missing files are reported before any decoding,
    so a wrong ``image_root`` fails at once. With ``skip_bad`` the good records are returned and
    the rest are logged as a warning.
    """
    total = len(records)
    exists = [r.image_path.is_file() for r in records]
    present = [r for r, found in zip(records, exists, strict=True) if found]
    missing = [str(r.image_path) for r, found in zip(records, exists, strict=True) if not found]
    if missing and not skip_bad:
        raise DatasetFormatError(
            _problem("are missing", missing, total, source)
            + "; expected every image under the image root (check data.image_root; "
            + "data.skip_bad_images: true leaves them out)"
        )
    good = present
    broken: list[str] = []
    if decode and present:
        errors = _decode_all([r.image_path for r in present], workers)
        good = [r for r, error in zip(present, errors, strict=True) if error is None]
        broken = [f"{r.image_path} ({e})" for r, e in zip(present, errors, strict=True) if e]
        if broken and not skip_bad:
            raise DatasetFormatError(
                _problem("cannot be decoded", broken, total, source)
                + "; expected complete, readable images "
                + "(data.skip_bad_images: true leaves them out)"
            )
    for what, bad in (("are missing", missing), ("cannot be decoded", broken)):
        if bad:
            log.warning("skipping images: %s", _problem(what, bad, total, source))
    return good
