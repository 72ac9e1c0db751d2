"""On-disk cache of frozen-tower features, so frozen backbones run once per item, not per epoch.

Features are stored per item (an image, a caption) under two keys: the model's (architecture,
exact weights, preprocessing, batching) picks a folder, and each item's own content (the image's
bytes, the caption's text) picks its row. A changed file, checkpoint or setting gets a new key, so
a stale row is never read. Items are computed only when missing, so a run extracts what it uses
and a later, larger run adds the rest.

Rows are written in chunks of a few thousand items, each chunk a whole file written through
:mod:`adaptalign.common.atomic_files`: a killed extraction leaves its completed chunks (the next run
resumes after them) and never a torn one. There is no index to keep in step: loading opens every
chunk of the model's folder memory-mapped, reads its item keys and copies only the rows asked for.

Rows are either of one shape (a frozen tower's features, a frozen prefix's feature maps) or ragged
(a frozen text prefix: one ``(tokens, width)`` tensor per caption, stored unpadded: padding every
caption to the longest would store about three times as much for Flickr captions). A folder may
store its rows in half precision, which halves the cache on disk and in memory; a chunk whose
values half precision cannot hold is kept in float32.

Whole entries (one tensor under one data key) serve results that belong to a whole data set, such
as caption clusters.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from adaptalign.common.atomic_files import atomic_open, exclusive
from adaptalign.common.errors import ConfigurationError
from adaptalign.common.progress import Bar, say

log = logging.getLogger(__name__)

# Bump when what a model key covers changes, so entries of an older layout are never read.
FORMAT_VERSION = 2
CHUNK_PREFIX = "chunk-"
FILLING_LOCK = ".filling.lock"


def digest(parts: Iterable[bytes]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def module_digest(module: torch.nn.Module, *settings: str) -> str:
    """Digest of a module's exact weights and buffers plus the settings that shape its output."""
    return state_digest(module.state_dict(), *settings)


def state_digest(state: Mapping[str, Tensor], *settings: str) -> str:
    """Digest of named tensors (part of a module's state) plus the settings that shape an output."""

    def parts() -> Iterable[bytes]:
        yield f"v{FORMAT_VERSION}".encode()
        for setting in settings:
            yield setting.encode()
        for name, tensor in sorted(state.items()):
            yield name.encode()
            yield str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode()
            yield tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()

    return digest(parts())


def text_digest(texts: Sequence[str]) -> str:
    return digest(t.encode() for t in texts)


def first_positions(items: Sequence[str]) -> dict[str, int]:
    """Each distinct item with the position of its first occurrence: repeats are computed once."""
    return {item: i for i, item in reversed(list(enumerate(items)))}


Ragged = list[Tensor]
"""Rows of different lengths, one tensor per item."""


class Rows:
    """Feature rows looked up by item key, gathered from chunks and fresh computations."""

    def __init__(self) -> None:
        self.where: dict[str, int] = {}
        self.parts: list[Tensor] = []
        self.ragged: list[Tensor] = []
        self.count = 0

    def add(self, keys: Sequence[str], rows: Tensor | Ragged) -> None:
        for j, key in enumerate(keys):
            self.where.setdefault(key, self.count + j)
        if isinstance(rows, list):
            self.ragged.extend(rows)
        else:
            self.parts.append(rows)
        self.count += len(keys)

    def __contains__(self, key: object) -> bool:
        return key in self.where

    def __len__(self) -> int:
        return len(self.where)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def gather(self, keys: Sequence[str]) -> Tensor | Ragged:
        """The rows of ``keys``, in order (each must be present): one tensor, or for ragged rows
        one tensor per key."""
        if self.ragged:
            return [self.ragged[self.where[key]] for key in keys]
        if not keys:
            return torch.empty(0)
        index = torch.tensor([self.where[key] for key in keys])
        # Chunks kept in float32 (values beyond half precision) promote the others.
        return (torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0])[index]


class FeatureCache:
    """Per-item rows under ``<root>/features/<kind>/<model key>/chunk-*.pt``; whole entries beside.

    A whole entry lives at ``<root>/features/<kind>/<model key>/<data key>.pt``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def folder(self, kind: str, model_key: str) -> Path:
        return self.root / "features" / kind / model_key

    # ----------------------------------------------------------------------------- per-item rows

    def chunks(self, kind: str, model_key: str) -> list[Path]:
        folder = self.folder(kind, model_key)
        return sorted(folder.glob(f"{CHUNK_PREFIX}*.pt")) if folder.is_dir() else []

    def read_rows(self, kind: str, model_key: str, wanted: set[str]) -> Rows:
        """The stored rows of the ``wanted`` item keys (those not stored are simply absent)."""
        found = Rows()
        for path in self.chunks(kind, model_key):
            chunk = read_chunk(path)
            if chunk is None:
                continue
            keys, features, lengths = chunk
            rows = [i for i, key in enumerate(keys) if key in wanted and key not in found]
            if not rows:
                continue
            if lengths is None:
                # Indexing copies the rows off the memory map, reading only their pages.
                found.add([keys[i] for i in rows], features[torch.tensor(rows)])
            else:
                starts = [0, *torch.cumsum(lengths, 0).tolist()]
                found.add(
                    [keys[i] for i in rows],
                    [features[starts[i] : starts[i + 1]].clone() for i in rows],
                )
        return found

    def write_chunk(
        self, kind: str, model_key: str, keys: list[str], features: Tensor | Ragged
    ) -> Path:
        """One chunk of rows, whole or not at all; its name comes from its items.

        Ragged rows are stored end to end with their lengths."""
        count = len(features) if isinstance(features, list) else features.shape[0]
        if len(keys) != count:
            raise ValueError(f"{len(keys)} keys for {count} rows")
        if any("\n" in key for key in keys):
            raise ValueError("item keys are single lines")
        path = self.folder(kind, model_key) / f"{CHUNK_PREFIX}{text_digest(keys)}.pt"
        # The keys as one string: unpickling thousands of small strings would take longer than
        # reading the rows.
        entry: dict = {"keys": "\n".join(keys)}
        if isinstance(features, list):
            entry["features"] = torch.cat(features).contiguous()
            entry["lengths"] = torch.tensor([row.shape[0] for row in features])
        else:
            entry["features"] = features.contiguous()
        with atomic_open(path) as handle:
            torch.save(entry, handle)
        return path

    def rows(
        self,
        kind: str,
        model_key: str,
        keys: Sequence[str],
        compute: Callable[[list[int]], Iterable[tuple[list[int], Tensor]]],
        chunk_rows: int,
        bar: Callable[[list[int], int], Bar] | None = None,
        half: bool = False,
    ) -> Tensor | Ragged:
        """The rows of ``keys`` (in order, repeats allowed), computing only the missing items.

        ``compute(positions)`` gets the positions in ``keys`` of the missing items (one per
        distinct key) and yields ``(positions, rows)`` batches covering them, in any order and
        batch size (rows: a tensor, or one tensor per position for ragged rows); each time
        ``chunk_rows`` rows have come they are stored as one chunk before the next batch is asked
        for, so an interrupted extraction keeps what it finished. ``bar(missing, wanted)``
        reports progress over the ``missing`` positions (``wanted``: the number of distinct items
        asked for). ``half`` stores rows in float16 (the model key must say so).
        """
        first = first_positions(keys)
        stored = self.read_rows(kind, model_key, set(first))
        missing = sorted(i for key, i in first.items() if key not in stored)
        if not missing:
            return stored.gather(keys)
        # Runs started side by side (a comparison's jobs) want the same items: one process fills
        # the folder while the others wait, then read what it wrote and compute only the rest.
        folder = self.folder(kind, model_key)
        with exclusive(
            folder / FILLING_LOCK,
            on_wait=lambda: say(f"{kind} features: waiting for another process filling {folder}"),
        ):
            filled = self.read_rows(kind, model_key, {keys[i] for i in missing})
            if len(filled):
                stored.add(list(filled), filled.gather(list(filled)))
                missing = [i for i in missing if keys[i] not in stored]
            if missing:
                log.info(
                    "feature cache: %d of %d %s items to compute", len(missing), len(first), kind
                )
                report = bar(missing, len(first)) if bar is not None else None
                self._compute(
                    kind, model_key, keys, missing, compute, chunk_rows, report, stored, half
                )
        return stored.gather(keys)

    def _compute(
        self,
        kind: str,
        model_key: str,
        keys: Sequence[str],
        missing: list[int],
        compute: Callable[[list[int]], Iterable[tuple[list[int], Tensor]]],
        chunk_rows: int,
        report: Bar | None,
        done: Rows,
        half: bool = False,
    ) -> None:
        """Computes the missing items into chunks on disk and into ``done``."""
        names: list[str] = []
        pending: list[Tensor] = []
        ragged: Ragged = []

        def flush() -> None:
            rows: Tensor | Ragged = ragged[:] if ragged else torch.cat(pending)
            if half:
                rows = in_half(rows, kind)
            self.write_chunk(kind, model_key, names, rows)
            done.add(list(names), rows)
            names.clear()
            pending.clear()
            ragged.clear()

        for positions, batch in compute(missing):
            if len(positions) != len(batch):
                raise ValueError(f"{len(positions)} positions for {len(batch)} rows")
            names.extend(keys[i] for i in positions)
            if isinstance(batch, list):
                ragged.extend(row.detach().float().cpu() for row in batch)
            else:
                pending.append(batch.detach().float().cpu())
            if report is not None:
                report.update(len(positions))
            if len(names) >= chunk_rows:
                flush()
        if names:
            flush()
        if report is not None:
            report.close()
        absent = [keys[i] for i in missing if keys[i] not in done]
        if absent:
            raise RuntimeError(f"{len(absent)} of {len(missing)} {kind} items were not computed")

    # ----------------------------------------------------------------------------- whole entries

    def path(self, kind: str, model_key: str, data_key: str) -> Path:
        return self.folder(kind, model_key) / f"{data_key}.pt"

    def load(self, path: Path, rows: int) -> Tensor | None:
        """The cached tensor, or ``None`` when absent or unusable (then it is recomputed)."""
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            features = entry["features"]
        except Exception as exc:  # damaged from outside: recompute rather than fail
            log.warning("feature cache entry %s is unreadable (%s); recomputing", path, exc)
            return None
        if features.shape[0] != rows:
            log.warning(
                "feature cache entry %s has %d rows, expected %d; recomputing",
                path,
                features.shape[0],
                rows,
            )
            return None
        return features

    def save(self, path: Path, features: Tensor, meta: dict) -> None:
        with atomic_open(path) as handle:
            torch.save({"features": features.contiguous(), "meta": meta}, handle)

    def get_or_compute(
        self,
        kind: str,
        model_key: str,
        data_key: str,
        rows: int,
        compute: Callable[[], Tensor],
        meta: dict | None = None,
    ) -> Tensor:
        """Load the entry, or compute, store and return it."""
        path = self.path(kind, model_key, data_key)
        cached = self.load(path, rows)
        if cached is not None:
            log.info("feature cache hit: %s", path)
            return cached
        log.info("feature cache miss: computing %d %s features into %s", rows, kind, path)
        features = compute().detach().cpu()
        self.save(path, features, meta or {})
        return features


HALF_MAX = torch.finfo(torch.float16).max


def in_half(rows: Tensor | Ragged, kind: str) -> Tensor | Ragged:
    """The rows in float16, or unchanged (float32) when a value lies beyond its range."""
    parts = rows if isinstance(rows, list) else [rows]
    largest = max((float(r.abs().max()) for r in parts if r.numel()), default=0.0)
    if largest >= HALF_MAX:
        log.warning(
            "%s cache: a value of %g is beyond float16; this chunk is kept in float32",
            kind,
            largest,
        )
        return rows
    return [r.half() for r in rows] if isinstance(rows, list) else rows.half()


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds ``folder`` (or would, once made)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def check_space(folder: Path, needed: int, what: str, setting: str) -> None:
    """Refuse before filling a cache that the disk cannot hold (a half-filled disk helps no one)."""
    free = free_bytes(folder)
    if needed > free:
        raise ConfigurationError(
            f"{what} needs {size_text(needed)} in {folder}, but that disk has {size_text(free)} "
            f"free; free some space, point data.cache_dir at a larger disk, or change {setting}"
        )


def size_text(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def read_chunk(path: Path) -> tuple[list[str], Tensor, Tensor | None] | None:
    """A chunk's keys, (memory-mapped) rows and, for ragged rows, their lengths; ``None`` when it
    is unreadable.

    Chunks are only ever renamed into place whole, so an unreadable one was damaged from outside:
    it is removed and its items are computed again.
    """
    try:
        chunk = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        keys, features = chunk["keys"].split("\n"), chunk["features"]
        lengths = chunk.get("lengths")
        count = features.shape[0] if lengths is None else lengths.shape[0]
        if count != len(keys):
            raise ValueError(f"{len(keys)} keys for {count} rows")
        if lengths is not None and int(lengths.sum()) != features.shape[0]:
            raise ValueError(f"lengths add up to {int(lengths.sum())}, not {features.shape[0]}")
    except FileNotFoundError:
        return None
    except Exception as exc:
        log.warning("feature cache chunk %s is unreadable (%s); removed", path, exc)
        path.unlink(missing_ok=True)
        return None
    return keys, features, lengths
