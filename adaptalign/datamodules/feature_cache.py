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

Whole entries (one tensor under one data key) serve results that belong to a whole data set, such
as caption clusters.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from adaptalign.common.atomic_files import atomic_open, exclusive
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

    def parts() -> Iterable[bytes]:
        yield f"v{FORMAT_VERSION}".encode()
        for setting in settings:
            yield setting.encode()
        for name, tensor in sorted(module.state_dict().items()):
            yield name.encode()
            yield str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode()
            yield tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()

    return digest(parts())


def text_digest(texts: Sequence[str]) -> str:
    return digest(t.encode() for t in texts)


def first_positions(items: Sequence[str]) -> dict[str, int]:
    """Each distinct item with the position of its first occurrence: repeats are computed once."""
    return {item: i for i, item in reversed(list(enumerate(items)))}


class Rows:
    """Feature rows looked up by item key, gathered from chunks and fresh computations."""

    def __init__(self) -> None:
        self.where: dict[str, int] = {}
        self.parts: list[Tensor] = []
        self.count = 0

    def add(self, keys: Sequence[str], rows: Tensor) -> None:
        for j, key in enumerate(keys):
            self.where.setdefault(key, self.count + j)
        self.parts.append(rows)
        self.count += len(keys)

    def __contains__(self, key: object) -> bool:
        return key in self.where

    def __len__(self) -> int:
        return len(self.where)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def gather(self, keys: Sequence[str]) -> Tensor:
        """The rows of ``keys``, in order (each must be present)."""
        if not keys:
            return torch.empty(0)
        index = torch.tensor([self.where[key] for key in keys])
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
            chunk = _read_chunk(path)
            if chunk is None:
                continue
            keys, features = chunk
            rows = [i for i, key in enumerate(keys) if key in wanted and key not in found]
            if rows:
                # Indexing copies the rows off the memory map, reading only their pages.
                found.add([keys[i] for i in rows], features[torch.tensor(rows)])
        return found

    def write_chunk(self, kind: str, model_key: str, keys: list[str], features: Tensor) -> Path:
        """One chunk of rows, whole or not at all; its name comes from its items."""
        if len(keys) != features.shape[0]:
            raise ValueError(f"{len(keys)} keys for {features.shape[0]} rows")
        if any("\n" in key for key in keys):
            raise ValueError("item keys are single lines")
        path = self.folder(kind, model_key) / f"{CHUNK_PREFIX}{text_digest(keys)}.pt"
        # The keys as one string: unpickling thousands of small strings would take longer than
        # reading the rows.
        with atomic_open(path) as handle:
            torch.save({"keys": "\n".join(keys), "features": features.contiguous()}, handle)
        return path

    def rows(
        self,
        kind: str,
        model_key: str,
        keys: Sequence[str],
        compute: Callable[[list[int]], Iterable[tuple[list[int], Tensor]]],
        chunk_rows: int,
        bar: Callable[[int, int], Bar] | None = None,
    ) -> Tensor:
        """The rows of ``keys`` (in order, repeats allowed), computing only the missing items.

        ``compute(positions)`` gets the positions in ``keys`` of the missing items (one per
        distinct key) and yields ``(positions, rows)`` batches covering them, in any order and
        batch size; each time ``chunk_rows`` rows have come they are stored as one chunk before
        the next batch is asked for, so an interrupted extraction keeps what it finished.
        ``bar(missing, wanted)`` reports progress over the missing items (``wanted``: the
        distinct items asked for).
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
                report = bar(len(missing), len(first)) if bar is not None else None
                self._compute(kind, model_key, keys, missing, compute, chunk_rows, report, stored)
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
    ) -> None:
        """Computes the missing items into chunks on disk and into ``done``."""
        names: list[str] = []
        pending: list[Tensor] = []

        def flush() -> None:
            rows = torch.cat(pending)
            self.write_chunk(kind, model_key, names, rows)
            done.add(list(names), rows)
            names.clear()
            pending.clear()

        for positions, batch in compute(missing):
            if len(positions) != batch.shape[0]:
                raise ValueError(f"{len(positions)} positions for {batch.shape[0]} rows")
            names.extend(keys[i] for i in positions)
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


def _read_chunk(path: Path) -> tuple[list[str], Tensor] | None:
    """A chunk's keys and (memory-mapped) rows; ``None`` when it is unreadable.

    Chunks are only ever renamed into place whole, so an unreadable one was damaged from outside:
    it is removed and its items are computed again.
    """
    try:
        chunk = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        keys, features = chunk["keys"].split("\n"), chunk["features"]
        if features.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys for {features.shape[0]} rows")
    except FileNotFoundError:
        return None
    except Exception as exc:
        log.warning("feature cache chunk %s is unreadable (%s); removed", path, exc)
        path.unlink(missing_ok=True)
        return None
    return keys, features
