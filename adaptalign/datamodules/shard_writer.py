"""Writing records as WebDataset tar shards in img2dataset's layout.

Each record becomes ``KEY.<image>``, ``KEY.txt`` (its first caption) and ``KEY.json`` (all its
captions and its objects), so the shards read back through the same path as shards downloaded
with img2dataset, and a data set in any format the project reads can be trained on as a stream.
Images keep their bytes when they are JPEG, PNG or WebP (``KEY.jpg``, ``KEY.png``, ``KEY.webp``):
re-encoding would change the pixels, and a comparison between the folder and the stream of
the same data set would no longer compare like with like. Other formats are stored losslessly
as PNG.

Every shard is written under a temporary name and renamed when complete, so a writer that is
killed leaves no shard that looks whole and is not.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from webdataset import TarWriter

from adaptalign.common.atomic_files import atomic_open
from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.common.progress import Bar, progress_bar, say
from adaptalign.datamodules.records import Record

# Pillow's name of each image format stored as it is, and the extension it gets in a shard.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
KEY_DIGITS = 9
SHARD_DIGITS = 6


def shard_name(prefix: str, number: int) -> str:
    """``<prefix>-000042.tar``: six digits, as img2dataset numbers its shards."""
    return f"{prefix}-{number:0{SHARD_DIGITS}d}.tar"


def existing_shards(folder: Path, prefix: str) -> list[Path]:
    """The shards of a set named ``prefix`` already in ``folder``, in order."""
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{{SHARD_DIGITS}}}\.tar")
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if pattern.fullmatch(path.name))


def _image_member(path: Path) -> tuple[str, bytes]:
    """The image as (extension, bytes): unchanged if kept as it is, else as PNG."""
    try:
        with Image.open(path) as image:
            extension = KEPT_FORMATS.get(image.format or "")
            if extension is None:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                return "png", buffer.getvalue()
        return extension, path.read_bytes()
    except OSError as exc:
        raise DatasetFormatError(
            f"{path}: cannot read the image ({exc.strerror or exc}); "
            "expected an image file to store in a shard"
        ) from exc


def _sample(record: Record, key: str) -> dict[str, str | bytes]:
    """One record's tar members, keyed as webdataset's ``TarWriter`` takes them."""
    if not record.captions:
        raise DatasetFormatError(f"{record.image_path}: has no caption; expected at least one")
    extension, image = _image_member(record.image_path)
    metadata = {
        "key": key,
        "caption": record.captions[0],
        "captions": list(record.captions),
        "objects": list(record.objects),
    }
    return {
        "__key__": key,
        extension: image,
        "txt": record.captions[0].encode("utf-8"),
        "json": json.dumps(metadata, ensure_ascii=False).encode("utf-8"),
    }


def _write_shard(path: Path, records: Sequence[Record], first: int, bar: Bar) -> None:
    """One shard, complete under its name or not there at all.

    Members get a fixed time stamp, so the same records always give the same bytes.
    """
    with atomic_open(path, "wb") as file, TarWriter(file, encoder=False, mtime=0) as tar:
        for position, record in enumerate(records, start=first):
            tar.write(_sample(record, f"{position:0{KEY_DIGITS}d}"))
            bar.update()


def write_shards(
    records: Sequence[Record],
    folder: Path,
    prefix: str,
    shard_size: int,
    progress: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``records`` as shards ``<prefix>-000000.tar``, ... of ``shard_size`` records each.

    A record's key is its position in ``records`` (nine digits), unique over the whole set.
    An existing set with the same prefix is refused unless ``overwrite``; then each shard is
    replaced as the new one is complete, and shards beyond the new set's end are deleted last.
    """
    if shard_size < 1:
        raise ConfigurationError(f"shard_size={shard_size}; expected at least 1 record per shard")
    if not records:
        raise ConfigurationError(f"{folder}: no records to write; expected at least one")
    old = existing_shards(folder, prefix)
    if old and not overwrite:
        raise ConfigurationError(
            f"{folder}: already holds {len(old)} shards named {shard_name(prefix, 0)}, ...; "
            "expected a folder without them (delete them, choose another prefix, or overwrite)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(records), shard_size)
    if progress:
        say(f"writing {len(records)} images as {len(starts)} shards in {folder}")
    written = []
    with progress_bar(len(records), "writing shards", "image", enabled=progress) as bar:
        for number, start in enumerate(starts):
            path = folder / shard_name(prefix, number)
            _write_shard(path, records[start : start + shard_size], start, bar)
            written.append(path)
    for stale in set(old) - set(written):
        stale.unlink()
    return written
