"""``adaptalign shards OUTPUT``: a data set as WebDataset shards, and the config that reads them.

Without ``--config`` it writes the built-in generated long-tail data set, so streaming from
shards can be tried (and tested) without a download; with a fit config it writes that config's
data set (any annotation format) as it reads it. Each split gets its own shards
(``train-000000.tar``, ``val-...``, ``test-...``) in img2dataset's layout, and ``data.yaml``
beside them holds the data settings that stream them, to add after a fit config::

    adaptalign shards shards/generated
    adaptalign fit --config configs/quickstart.yaml --config shards/generated/data.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from adaptalign.common.arguments import CommandParser
from adaptalign.common.atomic_files import atomic_open
from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.builder import SPLITS, SplitSettings, read_records
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.datamodules.records import Record
from adaptalign.datamodules.shard_writer import SHARD_DIGITS, shard_name, write_shards

# The data settings that decide which records a data set has (not subsets, noise or batching).
READ_SETTINGS = (
    "annotations",
    "format",
    "image_root",
    "val_images",
    "test_images",
    "split_seed",
    "cache_dir",
    "skip_bad_images",
)
SETTING_NAMES = {"train": "shards", "val": "val_shards", "test": "test_shards"}
DEFAULT_SHARD_SIZE = 250  # the generated train split in 8 shards: 2 processes x 2 workers fit


def data_settings(config: Path | None) -> SplitSettings:
    """The record-deciding data settings of a fit config (its ``data`` section), or defaults."""
    if config is None:
        return SplitSettings()
    try:
        top = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"--config {config}: cannot read it as YAML ({exc})") from exc
    data: Any = top.get("data", {}) if isinstance(top, dict) else None
    if isinstance(data, dict) and "init_args" in data:
        data = data["init_args"]
    if not isinstance(data, dict):
        raise ConfigurationError(f"--config {config}: expected a 'data' section of settings")
    if data.get("format") == "webdataset":
        raise ConfigurationError(f"--config {config}: its data is in shards already")
    settings = {key: data[key] for key in READ_SETTINGS if key in data}
    generated = data.get("generated") or {}
    return SplitSettings(**settings, generated=GeneratedConfig(**generated))


def write_split_shards(
    records: list[Record], output: Path, shard_size: int, overwrite: bool
) -> dict[str, list[Path]]:
    """Each non-empty split's shards under ``output``."""
    written = {}
    for split in SPLITS:
        members = [r for r in records if r.split == split]
        if members:
            written[split] = write_shards(members, output, split, shard_size, overwrite=overwrite)
    return written


def pattern(folder: Path, prefix: str, count: int) -> str:
    """The brace pattern naming the ``count`` shards of ``prefix`` that ``write_shards`` wrote."""
    if count == 1:
        return str(folder / shard_name(prefix, 0))
    numbers = f"{{{0:0{SHARD_DIGITS}d}..{count - 1:0{SHARD_DIGITS}d}}}"
    return str(folder / f"{prefix}-{numbers}.tar")


def write_data_config(output: Path, written: dict[str, list[Path]]) -> Path:
    """``data.yaml``: the data settings that stream the shards just written."""
    data: dict[str, Any] = {"format": "webdataset"}
    for split, paths in written.items():
        data[SETTING_NAMES[split]] = pattern(output.resolve(), split, len(paths))
    path = output / "data.yaml"
    with atomic_open(path, "w") as handle:
        handle.write(
            "# The data settings that stream these shards (written by adaptalign shards)\n"
        )
        yaml.safe_dump({"data": data}, handle, sort_keys=False)
    return path


def main(argv: list[str] | None = None) -> int:
    """``adaptalign shards OUTPUT [--config fit.yaml] [--shard-size N] [--overwrite]``."""
    parser = CommandParser(
        prog="adaptalign shards",
        description="Write a data set (default: the built-in generated one) as WebDataset tar "
        "shards, one set per split, and data.yaml with the settings that stream them.",
    )
    parser.add_argument("output", type=Path, help="folder for the shards and data.yaml")
    parser.add_argument(
        "--config", type=Path, help="a fit config whose data section names the data set"
    )
    parser.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards")
    options = parser.parse_args(argv)
    if options.shard_size < 1:
        raise ConfigurationError(f"--shard-size={options.shard_size}; expected an integer >= 1")
    source, records = read_records(data_settings(options.config))
    options.output.mkdir(parents=True, exist_ok=True)
    written = write_split_shards(records, options.output, options.shard_size, options.overwrite)
    config = write_data_config(options.output, written)
    counts = ", ".join(f"{split} {len(paths)}" for split, paths in written.items())
    print(f"wrote {len(records)} images of {source} as shards ({counts}) in {options.output}")
    print(f"data settings: {config} (adaptalign fit --config ... --config {config})")
    return 0
