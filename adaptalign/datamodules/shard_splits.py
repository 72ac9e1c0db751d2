"""Split records of pairs stored in WebDataset shards: each shard list indexed once, by split.

``data.format: webdataset`` reads ``data.shards`` (train), ``data.val_shards`` and
``data.test_shards`` (each a brace pattern or a list of paths or URLs). The index pass reads
the captions, tags and keys of every shard, never an image (:mod:`.shard_index`), and gives one
record per pair, so subsets, the selection split, ontology tags and caption clusters work on
shards exactly as on annotation files; images are read later, by streaming the shards.

Runs select on the val shards, or, with ``data.selection_images``, on a selection split carved
from the train shards, and the val shards become the report split (as Flickr8k's dev). A sample
the index pass finds broken (no caption, no image) stops the run with its shard and key, unless
``data.skip_bad_images`` is set: then it is counted, logged and left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.records import Record
from adaptalign.datamodules.shard_files import expand_shards
from adaptalign.datamodules.shard_index import ShardIndex, index_shards, shard_records

ShardSpec = str | list[str] | None
SETTINGS = {"train": "data.shards", "val": "data.val_shards", "test": "data.test_shards"}
SHOWN = 3  # bad samples quoted in a refusal


def shard_lists(
    shards: ShardSpec, val_shards: ShardSpec, test_shards: ShardSpec
) -> dict[str, list[str]]:
    """Each split's shards, expanded and checked; no shard may serve two splits."""
    if shards is None:
        raise ConfigurationError(
            "data.format=webdataset needs data.shards: the training shards, as a brace pattern "
            "('pairs/train-{000000..000099}.tar') or a list of paths or URLs"
        )
    if val_shards is None:
        raise ConfigurationError(
            "data.format=webdataset needs data.val_shards: shards held out from training, which "
            "runs select on (with data.selection_images they become the report split instead)"
        )
    lists: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split, spec in (("train", shards), ("val", val_shards), ("test", test_shards)):
        if spec is None:
            continue
        urls = expand_shards(spec, SETTINGS[split])
        for url in urls:
            if url in owner:
                raise ConfigurationError(
                    f"{SETTINGS[split]}: shard {url!r} is also in {SETTINGS[owner[url]]}; "
                    "expected each shard in one split only"
                )
            owner[url] = split
        lists[split] = urls
    return lists


def refuse_bad_samples(indexes: Sequence[ShardIndex], setting: str) -> None:
    """Stop at broken samples, naming the first few by shard and key."""
    bad = [(index.url, key, reason) for index in indexes for key, reason in index.bad]
    if not bad:
        return
    shown = "; ".join(f"{url} sample {key!r}: {reason}" for url, key, reason in bad[:SHOWN])
    more = f" (and {len(bad) - SHOWN} more)" if len(bad) > SHOWN else ""
    raise DatasetFormatError(
        f"{setting}: {len(bad)} broken samples: {shown}{more}; data.skip_bad_images: true counts "
        "and leaves them out"
    )


def read_shard_splits(
    lists: dict[str, list[str]], cache_root: Path, skip_bad: bool, progress: bool = True
) -> list[Record]:
    """One record per pair of every split's shards, image ids counting on across the splits."""
    records: list[Record] = []
    for split, urls in lists.items():
        indexes = index_shards(urls, cache_root, progress)
        if not skip_bad:
            refuse_bad_samples(indexes, SETTINGS[split])
        records += shard_records(indexes, split, first_id=len(records))
    counts = {split: sum(r.split == split for r in records) for split in lists}
    if progress:
        shown = ", ".join(f"{split} {count}" for split, count in counts.items())
        rank_zero_info(f"webdataset pairs: {shown}")
    return records


def describe(lists: dict[str, list[str]]) -> str:
    """The source's name in messages: each split's shard count and first shard."""
    return ", ".join(
        f"{SETTINGS[split]} ({len(urls)} shards: {urls[0]}{', ...' if len(urls) > 1 else ''})"
        for split, urls in lists.items()
    )
