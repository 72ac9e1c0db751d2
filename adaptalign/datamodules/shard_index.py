"""The index pass over a WebDataset shard set: which samples each shard holds, with their text.

Everything the project does before training (subsets, the selection carve, ontology tags,
caption clusters) works on records, so one streaming pass reads each shard's captions and
objects, without decoding an image, and turns them into records that name their shard and key.
A shard's index is cached under its identity, so a second run, or a second rank, reads no shard
again; a shard that changes gets a new identity and is read afresh.

Samples that cannot be used (no caption, no image, a json that does not parse) are left out
and reported, shard and key, in one line: img2dataset shards of a web crawl always hold a few,
and stopping the run for them would make such data sets unusable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptalign.common.atomic_files import atomic_save, exclusive
from adaptalign.common.progress import progress_bar, say
from adaptalign.datamodules.records import Record
from adaptalign.datamodules.shard_files import IMAGE_EXTENSIONS, read_samples, shard_identity

log = logging.getLogger(__name__)

TEXT_EXTENSIONS = ("txt", "json")
INDEX_VERSION = 1  # bump whenever the same shard would give a different index
CACHE_FOLDER = "shard-index"
LOCK_FILE = ".indexing.lock"
SHOWN = 3  # bad samples quoted in the summary line: enough to spot a pattern

NO_CAPTION = "no caption: expected KEY.txt or a 'caption' field in KEY.json"
NO_IMAGE = "no image: expected KEY." + "/.".join(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class ShardSample:
    """One usable sample of a shard: its key, captions and ontology tags."""

    key: str
    captions: tuple[str, ...]
    objects: tuple[str, ...] = ()


@dataclass
class ShardIndex:
    """What one shard holds: its usable samples in file order, and the unusable ones with why."""

    url: str
    identity: str
    samples: list[ShardSample]
    bad: list[tuple[str, str]] = field(default_factory=list)


class _BadSample(ValueError):
    """Why one sample cannot be used; the sample is left out, not the run stopped."""


def _strings(value: Any, name: str) -> tuple[str, ...]:
    """A json list of strings, stripped and without empty ones."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _BadSample(f"'{name}' in KEY.json is not a list of strings")
    return tuple(text for item in value if (text := item.strip()))


def _metadata(members: dict[str, bytes]) -> dict[str, Any]:
    """The sample's json object, empty when it has none."""
    if "json" not in members:
        return {}
    try:
        metadata = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _BadSample(f"KEY.json is not valid JSON ({exc}); expected an object") from exc
    if not isinstance(metadata, dict):
        raise _BadSample(f"KEY.json holds a JSON {type(metadata).__name__}; expected an object")
    return metadata


def _text(members: dict[str, bytes]) -> str:
    """The sample's ``KEY.txt``, stripped; empty when it has none."""
    try:
        return members.get("txt", b"").decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise _BadSample(f"KEY.txt is not UTF-8 text ({exc})") from exc


def _captions(members: dict[str, bytes], metadata: dict[str, Any]) -> tuple[str, ...]:
    """All captions of a sample: the json ``captions`` list (several per image, as the
    project's own writer stores them), else ``KEY.txt``, else the json ``caption`` field (as
    img2dataset stores it beside the txt)."""
    listed = _strings(metadata.get("captions", []), "captions")
    if listed:
        return listed
    text = _text(members)
    if text:
        return (text,)
    caption = metadata.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise _BadSample("'caption' in KEY.json is not a string")
    return (caption.strip(),) if caption and caption.strip() else ()


def _sample(key: str, members: dict[str, bytes]) -> ShardSample:
    """The usable sample of one key's members, or :class:`_BadSample` saying why not."""
    metadata = _metadata(members)
    captions = _captions(members, metadata)
    if not captions:
        raise _BadSample(NO_CAPTION)
    if not any(extension in members for extension in IMAGE_EXTENSIONS):
        raise _BadSample(NO_IMAGE)
    objects = _strings(metadata.get("objects", []), "objects")
    return ShardSample(key, captions, objects)


def index_shard(url: str) -> ShardIndex:
    """One shard's samples, read in one pass over its text members (images are not decoded).

    Image members have to be read from the stream anyway to know they exist; each is dropped
    as soon as the next sample starts.
    """
    identity = shard_identity(url)
    samples: list[ShardSample] = []
    bad: list[tuple[str, str]] = []
    for key, members in read_samples(url, TEXT_EXTENSIONS + IMAGE_EXTENSIONS):
        try:
            samples.append(_sample(key, members))
        except _BadSample as why:
            bad.append((key, str(why)))
    return ShardIndex(url, identity, samples, bad)


def _cache_path(cache_root: Path, identity: str) -> Path:
    return cache_root / CACHE_FOLDER / f"{identity}.json"


def _save(index: ShardIndex, path: Path) -> None:
    """The index as compact json: a shard of 10,000 samples makes about a megabyte."""
    content = {
        "version": INDEX_VERSION,
        "url": index.url,
        "samples": [[s.key, list(s.captions), list(s.objects)] for s in index.samples],
        "bad": [list(item) for item in index.bad],
    }
    atomic_save(path, json.dumps(content, ensure_ascii=False, separators=(",", ":")))


def _load(url: str, identity: str, path: Path) -> ShardIndex | None:
    """The cached index of a shard, or ``None`` when there is none this version can use.

    The url comes from the caller, not the file: the same shard may be spelt differently.
    """
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if content["version"] != INDEX_VERSION:
            return None
        samples = [ShardSample(k, tuple(c), tuple(o)) for k, c, o in content["samples"]]
        bad = [(key, why) for key, why in content["bad"]]
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return ShardIndex(url, identity, samples, bad)


def _summary(indexes: Sequence[ShardIndex]) -> str:
    images = sum(len(index.samples) for index in indexes)
    captions = sum(len(s.captions) for index in indexes for s in index.samples)
    text = f"shard index: shards {len(indexes)}, images {images}, captions {captions}"
    bad = [f"{index.url}/{key}: {why}" for index in indexes for key, why in index.bad]
    if bad:
        text += f"; {len(bad)} bad samples left out, e.g. " + "; ".join(bad[:SHOWN])
    return text


def _read_unindexed(
    found: dict[str, ShardIndex | None], paths: dict[str, Path], progress: bool
) -> None:
    """Index and cache the shards ``found`` has no index of, filling them in."""
    unread = [url for url, index in found.items() if index is None]
    if not unread:  # another process indexed them while this one waited
        return
    if progress:
        say(f"indexing {len(unread)} of {len(found)} shards (reading their captions)")
    with progress_bar(len(unread), "indexing shards", "shard", enabled=progress) as bar:
        for url in unread:
            found[url] = index_shard(url)
            _save(found[url], paths[url])
            bar.update()


def index_shards(urls: Sequence[str], cache_root: Path, progress: bool = True) -> list[ShardIndex]:
    """The index of every shard, in order: read from the cache, or from the shard and cached.

    Processes sharing the cache (the ranks of one run, the runs of a comparison) index each
    shard once: one reads while the others wait, then they load what it wrote. Ends with one
    summary line, a warning when bad samples were left out.
    """
    paths = {url: _cache_path(cache_root, shard_identity(url)) for url in urls}
    found = {url: _load(url, path.stem, path) for url, path in paths.items()}
    if None in found.values():
        folder = cache_root / CACHE_FOLDER
        with exclusive(
            folder / LOCK_FILE,
            on_wait=lambda: say(f"shard index: waiting for another process filling {folder}"),
        ):
            found = {url: _load(url, path.stem, path) for url, path in paths.items()}
            _read_unindexed(found, paths, progress)
    indexes = [found[url] for url in urls]
    if any(index.bad for index in indexes):
        log.warning("%s", _summary(indexes))
    elif progress:
        say(_summary(indexes))
    return indexes


def shard_records(indexes: Sequence[ShardIndex], split: str, first_id: int = 0) -> list[Record]:
    """The records of the shards' samples, numbered in order over all shards from ``first_id``.

    A record's ``image_path`` (``<shard>/<key>``) only names the pair in messages; its image is
    found by ``shard`` and ``key``.
    """
    records = []
    for index in indexes:
        for sample in index.samples:
            records.append(
                Record(
                    image_path=Path(index.url) / sample.key,
                    captions=sample.captions,
                    image_id=first_id + len(records),
                    split=split,
                    objects=sample.objects,
                    shard=index.url,
                    key=sample.key,
                )
            )
    return records
