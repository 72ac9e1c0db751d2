"""WebDataset tar shards as a list of names and as a stream of samples.

A shard set is named the WebDataset way, with braces (``data/shard-{000000..000099}.tar``), as
local paths or as URLs that webdataset knows how to open (``https://``, ``pipe:``, ...). Local
shards are checked when the setting is read, so a typo fails at once, naming the setting, rather
than after the index pass has read half the set. A sample is the tar members that share a key
(``000123.jpg``, ``000123.txt``, ``000123.json``), grouped by webdataset's own tar iteration so
the layout read here is exactly the one webdataset's tools write and read.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from braceexpand import braceexpand
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from adaptalign.common.errors import ConfigurationError, DatasetFormatError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# What reading a tar stream raises when the shard is missing, unreadable or cut short.
_READ_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)
_TAR_BLOCK = 512
# How gzip, bzip2 and xz streams begin: webdataset reads such shards (.tar.gz, ...) too.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_MAGIC_LENGTH = max(len(magic) for magic in _COMPRESSED_MAGIC)


def local_path(url: str) -> Path | None:
    """The file a shard name points to, or ``None`` for a URL that is opened remotely."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return Path(url).expanduser()
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return None


def _check_scheme(url: str, setting: str) -> None:
    """Refuse a URL scheme webdataset cannot open now, not when the first worker meets it."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in gopen_schemes:
        return
    known = ", ".join(f"{name}:" for name in sorted(gopen_schemes) if not name.startswith("_"))
    raise ConfigurationError(
        f"{setting}: shard '{url}' has a scheme ('{scheme}:') that webdataset cannot open; "
        f"expected a local path, file://, or one of {known} "
        f"(e.g. 'pipe:aws s3 cp {url} -' for S3)"
    )


def _expand(spec: str | Sequence[str]) -> list[str]:
    """Every shard name in ``spec``, braces expanded, in the order written."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    return [name for entry in entries for name in braceexpand(entry.strip()) if name]


def _normalised(url: str) -> str:
    """A local shard as an absolute path, so workers started elsewhere still find it."""
    path = local_path(url)
    return url if path is None else os.path.abspath(path)


def _missing_message(setting: str, missing: list[str], total: int) -> str:
    first = missing[0]
    if Path(first).is_dir():
        return (
            f"{setting}: shard '{first}' is a folder; expected tar files, named with braces "
            f"such as '{first}/shard-{{000000..000009}}.tar'"
        )
    several = f" ({len(missing)} of {total} shards are missing)" if len(missing) > 1 else ""
    return (
        f"{setting}: shard '{first}' does not exist{several}; "
        "expected an existing tar file or a URL (https://..., pipe:...)"
    )


def expand_shards(spec: str | Sequence[str], setting: str) -> list[str]:
    """The shard names of ``spec``: braces expanded, in order, local ones absolute and existing.

    ``setting`` names where the spec came from (``data.shards``) for error messages.
    URLs are not checked: reaching them may take credentials or time, and the index pass
    reports the first one that cannot be read.
    """
    urls = [_normalised(name) for name in _expand(spec)]
    if not urls:
        raise ConfigurationError(
            f"{setting}: names no shards; expected tar files or URLs, "
            "e.g. 'data/shard-{000000..000099}.tar'"
        )
    seen: set[str] = set()
    for url in urls:
        _check_scheme(url, setting)
        if url in seen:
            raise ConfigurationError(
                f"{setting}: shard '{url}' is named twice; expected each shard once"
            )
        seen.add(url)
    missing = [url for url in urls if (path := local_path(url)) is not None and not path.is_file()]
    if missing:
        raise ConfigurationError(_missing_message(setting, missing, len(urls)))
    return urls


def shard_identity(url: str) -> str:
    """A digest that changes when the shard does, to key caches of what was read from it.

    A local file is known by its resolved path, size and modification time (reading it whole
    would cost as much as the work the cache saves); a URL by itself, since shard sets are
    published once and not rewritten in place.
    """
    path = local_path(url)
    if path is None:
        text = url
    else:
        try:
            stat = path.stat()
        except OSError as exc:
            raise DatasetFormatError(
                f"{url}: cannot read the shard ({exc.strerror}); expected an existing tar file"
            ) from exc
        text = f"{path.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _extension(name: str) -> str | None:
    """A member's extension as webdataset groups it: after the first dot of the file name."""
    _, extension = base_plus_ext(name)
    return None if extension is None else extension.lower()


def _refuse_repeats(files: Iterable[dict[str, Any]], url: str) -> Iterator[dict[str, Any]]:
    """The tar members unchanged, refusing a key that comes back after other keys, or a member
    named twice: either would silently merge or split samples further on."""
    seen: set[str] = set()
    current: str | None = None
    extensions: set[str] = set()
    for file in files:
        key, extension = base_plus_ext(file.get("fname", ""))
        if key is not None:
            if key != current:
                if key in seen:
                    raise DatasetFormatError(
                        f"{url}: key '{key}' appears twice; "
                        "expected each sample's members together and each key once"
                    )
                seen.add(key)
                current, extensions = key, set()
            if extension.lower() in extensions:
                raise DatasetFormatError(
                    f"{url}: member '{key}.{extension}' appears twice; expected each KEY.EXT once"
                )
            extensions.add(extension.lower())
        yield file


class _CountingReader:
    """A shard's byte stream that counts what it delivers, to notice a shard cut short.

    Python's tar reader takes a header block cut short as the end of the archive, so a shard
    truncated there would silently lose its last samples. An uncompressed tar is whole blocks of
    512 bytes, so a stream that ends after a count of bytes that is not a multiple of 512 was
    cut; compressed streams (.tar.gz, ...) notice a cut themselves.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.count = 0
        self.ended = False
        self.start = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if len(self.start) < _MAGIC_LENGTH:
            self.start = (self.start + data)[:_MAGIC_LENGTH]
        self.count += len(data)
        self.ended = self.ended or not data
        return data

    def cut_short(self) -> bool:
        compressed = self.start.startswith(_COMPRESSED_MAGIC)
        return self.ended and not compressed and self.count % _TAR_BLOCK != 0


def _reason(exc: BaseException, stream: IO[bytes] | None) -> str:
    """What went wrong, without the stream objects webdataset appends to an error's text."""
    status = getattr(stream, "status", None)  # a pipe's exit status (pipe:, http://, ...)
    if status:
        return f"its command exited with status {status}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if exc.args:
        return str(exc.args[0]).split(" @ ")[0]
    return type(exc).__name__


def _open(url: str) -> IO[bytes]:
    """The shard's byte stream, local or remote, opened by webdataset."""
    try:
        return gopen(url, "rb")
    except _READ_ERRORS as exc:
        raise DatasetFormatError(
            f"{url}: cannot open the shard ({_reason(exc, None)}); expected a readable tar file"
        ) from exc


def read_samples(
    url: str, extensions: Collection[str] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """One shard's samples in file order, as ``(key, {extension: bytes})``.

    Only members with one of ``extensions`` (all when ``None``) are read into memory, so an
    index pass does not hold images and a training stream does not hold captions it ignores; a
    sample none of whose members is wanted is not yielded. A shard that cannot be opened, is cut
    short, or repeats a key is a :class:`DatasetFormatError` naming it.
    """
    wanted = None if extensions is None else {extension.lower() for extension in extensions}

    def select(name: str) -> bool:
        return wanted is None or _extension(name) in wanted

    stream = _open(url)
    reader = _CountingReader(stream)
    try:
        with closing(stream):
            files = tar_file_expander([{"url": url, "stream": reader}], select_files=select)
            for sample in group_by_keys(_refuse_repeats(files, url)):
                members = {name: data for name, data in sample.items() if not name.startswith("__")}
                yield sample["__key__"], members
    except DatasetFormatError:
        raise
    except _READ_ERRORS as exc:
        raise DatasetFormatError(
            f"{url}: cannot read the shard ({_reason(exc, stream)}); "
            "expected a complete tar file of KEY.EXT members"
        ) from exc
    if reader.cut_short():
        raise DatasetFormatError(
            f"{url}: the shard ends inside a tar block after {reader.count} bytes; "
            "expected a complete tar file (was it cut short while writing or copying?)"
        )
