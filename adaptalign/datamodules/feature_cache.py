"""On-disk cache of frozen-tower features, so frozen backbones run once per dataset, not per epoch.

An entry is addressed by two keys: the tower's (architecture, exact weights, preprocessing) and the
data's (the bytes of every image, or the text of every caption, in order). Any change to either
gives a different address, so a stale entry is never read. Entries are written to a temporary file
and renamed into place, so a killed run leaves either a complete entry or none.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from adaptalign.atomic_files import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


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


def file_digest(paths: Sequence[Path], progress: bool = True) -> str:
    """Digest of the content of many files, in order (a changed file changes it)."""

    def parts() -> Iterable[bytes]:
        for path in tqdm(
            paths, desc="hashing images", unit="file", disable=not progress, leave=False
        ):
            yield str(path.name).encode()
            yield path.read_bytes()

    return digest(parts())


def text_digest(texts: Sequence[str]) -> str:
    return digest(t.encode() for t in texts)


class FeatureCache:
    """Feature tensors under ``<root>/features/<kind>/<model key>/<data key>.pt``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def path(self, kind: str, model_key: str, data_key: str) -> Path:
        return self.root / "features" / kind / model_key / f"{data_key}.pt"

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
        with atomic_write(path) as handle:
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
