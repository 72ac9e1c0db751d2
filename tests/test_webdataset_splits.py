"""Shards as a data set: `adaptalign shards` writes them, the index pass reads them back as records.

The records, subsets, ontology tags and caption clusters of a data set read from shards are those
of the same data set read from its annotation file; bad settings and broken samples are one line.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import yaml

from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.builder import SplitSettings, build_splits
from adaptalign.datamodules.clusters import ClusterConfig
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.datamodules.ontology import OntologyConfig
from adaptalign.experiments.shards import main as shards_main

GENERATED = {"num_train": 40, "num_val": 8, "num_test": 8, "image_size": 32, "seed": 3}


@pytest.fixture()
def written(tmp_path: Path, cache_dir: Path) -> dict:
    """The small generated data set written as shards of 16 images, and its data settings."""
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({"data": {"generated": GENERATED}}))
    args = [str(tmp_path / "shards"), "--config", str(config), "--shard-size", "16"]
    assert shards_main(args) == 0
    return yaml.safe_load((tmp_path / "shards" / "data.yaml").read_text())["data"]


def _folder_settings(**extra: object) -> SplitSettings:
    return SplitSettings(generated=GeneratedConfig(**GENERATED), **extra)


def _shard_settings(data: dict, **extra: object) -> SplitSettings:
    return SplitSettings(
        format="webdataset",
        shards=data["shards"],
        val_shards=data["val_shards"],
        test_shards=data["test_shards"],
        **extra,
    )


def test_the_command_writes_every_split_and_the_settings_that_read_them(
    written: dict, tmp_path: Path
) -> None:
    folder = tmp_path / "shards"
    assert sorted(p.name for p in folder.glob("*.tar")) == [
        "test-000000.tar",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "val-000000.tar",
    ]
    assert written == {
        "format": "webdataset",
        "shards": str(folder.resolve() / "train-{000000..000002}.tar"),
        "val_shards": str(folder.resolve() / "val-000000.tar"),
        "test_shards": str(folder.resolve() / "test-000000.tar"),
    }


def test_shards_give_the_records_subsets_and_tags_of_the_annotation_file(written: dict) -> None:
    extra = {"train_images": 24, "seed": 1, "ontology": OntologyConfig()}
    folder = build_splits(_folder_settings(**extra))
    shards = build_splits(_shard_settings(written, **extra))
    for split in ("train", "val", "test"):
        assert [(r.captions, r.objects) for r in shards.splits[split]] == [
            (r.captions, r.objects) for r in folder.splits[split]
        ], split
    assert all(r.shard.endswith(".tar") and r.key for r in shards.records)
    assert len({r.image_id for r in shards.records}) == len(shards.records) == 56


def test_clusters_from_the_shards_index_pass_equal_the_in_memory_ones(
    written: dict, tiny_text_model: str
) -> None:
    clusters = ClusterConfig(num_clusters=4, text_model=tiny_text_model)
    folder = build_splits(_folder_settings(clusters=clusters))
    shards = build_splits(_shard_settings(written, clusters=clusters))
    by_id = {r.image_id: r for r in folder.splits["train"]}
    pairs = zip(folder.splits["train"], shards.splits["train"], strict=True)
    for folder_record, shard_record in pairs:
        assert folder_record.captions == shard_record.captions
        assert (
            folder.caption_clusters.labels[by_id[folder_record.image_id].image_id].tolist()
            == shards.caption_clusters.labels[shard_record.image_id].tolist()
        )
    assert folder.caption_clusters.sizes.tolist() == shards.caption_clusters.sizes.tolist()


def test_a_selection_split_is_carved_from_the_train_shards(written: dict) -> None:
    built = build_splits(_shard_settings({**written, "test_shards": None}, selection_images=10))
    assert [len(built.splits[s]) for s in ("train", "val", "test")] == [30, 10, 8]
    assert all(r.shard.split("/")[-1].startswith("train-") for r in built.splits["val"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shards": None}, r"data.format=webdataset needs data.shards"),
        ({"val_shards": None}, r"data.format=webdataset needs data.val_shards"),
        ({"annotations": "x.json"}, r"data.annotations is set with data.format=webdataset"),
        ({"verify_images": True}, r"data.verify_images=true with data.format=webdataset"),
    ],
)
def test_incomplete_shard_settings_are_one_line(written: dict, change: dict, message: str) -> None:
    data = {**written, **{k: v for k, v in change.items() if k.endswith("shards")}}
    extra = {k: v for k, v in change.items() if not k.endswith("shards")}
    with pytest.raises(ConfigurationError, match=message) as caught:
        build_splits(_shard_settings(data, **extra))
    assert "\n" not in str(caught.value)


def test_a_shard_in_two_splits_is_refused(written: dict) -> None:
    data = {**written, "test_shards": written["val_shards"]}
    with pytest.raises(ConfigurationError, match=r"data.test_shards: shard .* is also in data.val"):
        build_splits(_shard_settings(data))


def _add_captionless_sample(shard: Path) -> None:
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("zz-broken.png")
        data = shard.with_suffix("").name.encode()  # any bytes: the index never decodes images
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_a_broken_sample_stops_the_run_or_is_left_out_with_skip_bad_images(
    written: dict,
) -> None:
    shard = Path(written["val_shards"])
    _add_captionless_sample(shard)
    with pytest.raises(DatasetFormatError, match=r"data.val_shards: 1 broken samples: .*zz-broken"):
        build_splits(_shard_settings(written))
    built = build_splits(_shard_settings(written, skip_bad_images=True))
    assert len(built.splits["val"]) == 8
