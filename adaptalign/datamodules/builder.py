"""From the data settings to split record lists: read, check, subset, and enrich the training split.

Nothing here keeps state or knows a trainer. The data module calls :func:`build_splits` in
``setup`` and keeps what it returns; its ``prepare_data`` calls the same only to fill the
caption-cluster cache. The training split is enriched once: object tags from the ontology, and the
long-tail cluster of every caption; the validation captions join their nearest cluster at once, the
test (report) split's only when it is evaluated (:func:`assign_evaluation_clusters`). Noise is
applied per loader (:func:`noisy_split`), since a stress test changes the evaluation noise between
runs of one data module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.clusters import (
    ClusterConfig,
    Clustering,
    assign_captions,
    cluster_captions,
    cluster_size_report,
    size_buckets,
)
from adaptalign.datamodules.datasets import CaptionClusters
from adaptalign.datamodules.feature_cache import FeatureCache
from adaptalign.datamodules.formats import read_dataset
from adaptalign.datamodules.generated import GeneratedConfig, default_cache_dir, generate_dataset
from adaptalign.datamodules.image_check import check_images
from adaptalign.datamodules.noise import NoiseConfig, caption_vocabulary, noisy_records
from adaptalign.datamodules.ontology import (
    Ontology,
    OntologyConfig,
    format_summary,
    load_image_tags,
)
from adaptalign.datamodules.records import Record
from adaptalign.datamodules.selection import Selection, carve_selection
from adaptalign.datamodules.shard_splits import ShardSpec, read_shard_splits, shard_lists
from adaptalign.datamodules.shard_splits import describe as describe_shards
from adaptalign.datamodules.subsets import cap_captions, nested_subset

Format = Literal["auto", "karpathy", "flickr8k", "flickr30k", "csv", "coco", "webdataset"]
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSettings:
    """The data module's settings that decide the split record lists (same names and meaning).

    ``ontology`` set tags the training pairs with objects; ``None`` leaves them untagged.
    """

    annotations: str | list[str] | None = None
    format: Format = "auto"
    shards: ShardSpec = None
    val_shards: ShardSpec = None
    test_shards: ShardSpec = None
    image_root: str | None = None
    val_images: int | None = None
    test_images: int | None = None
    split_seed: int = 0
    generated: GeneratedConfig = field(default_factory=GeneratedConfig)
    cache_dir: str | None = None
    train_images: int | float | None = None
    selection_images: int | float | None = None
    captions_per_image: int | None = None
    verify_images: bool = False
    skip_bad_images: bool = False
    ontology: OntologyConfig | None = None
    clusters: ClusterConfig | None = None
    seed: int = 0


@dataclass
class Splits:
    """What ``setup`` keeps: every record read and checked, the splits, the captions' clusters,
    and the selection split carved from train (``None`` unless ``selection_images`` is set)."""

    source: str
    records: list[Record]
    splits: dict[str, list[Record]]
    caption_clusters: CaptionClusters | None = None
    selection: Selection | None = None


def feature_cache(cache_dir: str | None) -> FeatureCache:
    """The cache of frozen-tower features and caption clusters (default: the user's cache)."""
    return FeatureCache(cache_dir or default_cache_dir())


def annotation_paths(settings: SplitSettings) -> list[Path]:
    """The annotation files; without any, the generated dataset's (generated first if needed);
    none for shards, which hold their captions themselves."""
    if settings.format == "webdataset":
        return []
    if settings.annotations is None:
        return [generate_dataset(settings.generated, settings.cache_dir)]
    given = settings.annotations
    paths = [Path(p).expanduser() for p in ([given] if isinstance(given, str) else given)]
    for path in paths:
        if not path.is_file():
            raise ConfigurationError(f"data.annotations: {str(path)!r} does not exist")
    return paths


def build_splits(settings: SplitSettings, summarise: bool = True) -> Splits:
    """Read and check the records, then split, subset and enrich them.

    ``summarise`` logs the object tags' and the clusters' summaries (once per run is enough).
    With ``selection_images`` the records are relabelled first (see
    :mod:`~adaptalign.datamodules.selection`), so the subset, the tags and the clusters see the
    train split that remains.
    """
    source, records = read_records(settings, summarise)
    selection = None
    if settings.selection_images is not None:
        records, selection = carve_selection(
            records, settings.selection_images, settings.split_seed, source
        )
        if summarise:
            rank_zero_info(selection.describe())
    splits = {name: [r for r in records if r.split == name] for name in SPLITS}
    try:
        train = nested_subset(splits["train"], settings.train_images, settings.seed)
    except ConfigurationError as exc:
        if selection is None:
            raise
        raise ConfigurationError(
            f"{exc} (what remains after data.selection_images took {selection.selection_images})"
        ) from exc
    splits["train"] = cap_captions(train, settings.captions_per_image)
    if settings.ontology is not None:
        splits["train"] = tag_objects(splits["train"], settings.ontology, summarise)
    clusters = None
    if settings.clusters is not None:
        # Only val, the split fit selects on: the test (report) split joins its clusters when its
        # loader is built, so nothing reads it before the checkpoint is selected.
        clusters = cluster_training_captions(
            splits["train"],
            records,
            splits["val"],
            settings.clusters,
            feature_cache(settings.cache_dir),
            summarise,
        )
    return Splits(source, records, splits, clusters, selection)


def read_records(settings: SplitSettings, summarise: bool = True) -> tuple[str, list[Record]]:
    """The data set's name in messages and all its records, read and checked."""
    if settings.format == "webdataset":
        if settings.annotations is not None:
            raise ConfigurationError(
                "data.annotations is set with data.format=webdataset, whose shards hold the "
                "captions; expected data.shards (and data.val_shards) only"
            )
        if settings.verify_images:
            raise ConfigurationError(
                "data.verify_images=true with data.format=webdataset: shard images are checked as "
                "they stream; data.skip_bad_images decides whether a broken one stops the run"
            )
        lists = shard_lists(settings.shards, settings.val_shards, settings.test_shards)
        cache = feature_cache(settings.cache_dir).root
        records = read_shard_splits(lists, cache, settings.skip_bad_images, progress=summarise)
        return describe_shards(lists), records
    paths = annotation_paths(settings)
    source = ", ".join(str(p) for p in paths)
    records = read_dataset(
        [str(p) for p in paths] if len(paths) > 1 else str(paths[0]),
        format="karpathy" if settings.annotations is None else settings.format,
        image_root=settings.image_root,
        val_images=settings.val_images,
        test_images=settings.test_images,
        split_seed=settings.split_seed,
    )
    records = check_images(
        records, decode=settings.verify_images, skip_bad=settings.skip_bad_images, source=source
    )
    return source, records


def tag_objects(
    train: list[Record], config: OntologyConfig, summarise: bool = True
) -> list[Record]:
    """Training records carrying their object tags, with the untagged policy applied."""
    image_tags = None
    if config.image_tags is not None:
        by_name = load_image_tags(config.image_tags)
        image_tags = {
            r.image_id: by_name[r.image_path.name] for r in train if r.image_path.name in by_name
        }
    tagged, summary = Ontology.from_config(config).prepare(train, image_tags)
    if summarise:
        rank_zero_info(f"ontology tags: {format_summary(summary)}")
    return tagged


def cluster_training_captions(
    train: list[Record],
    records: list[Record],
    evaluated: list[Record],
    config: ClusterConfig,
    cache: FeatureCache,
    summarise: bool = True,
) -> CaptionClusters:
    """Cluster every caption of the train split once; count sizes over the captions in use.

    The clusters are fitted on the whole train split of ``records``, so a subset's clusters are
    those of the full data; ``train`` (the subset, captions capped) decides the sizes. Evaluation
    captions join the cluster of their nearest centroid, so recall can be reported for head,
    middle and tail queries by the tercile of that cluster's training size. The centroids are
    kept, so further splits join later (:func:`assign_evaluation_clusters`).
    """
    full = [r for r in records if r.split == "train"]
    clustering = cluster_captions(
        [c for r in full for c in r.captions],
        config,
        cache,
        assign=[c for r in evaluated for c in r.captions],
        keep_centres=True,
    )
    labels = _per_image(full, clustering.labels)
    used = np.concatenate([labels[r.image_id][: len(r.captions)] for r in train])
    sizes = np.bincount(used, minlength=len(clustering.sizes))
    in_use = Clustering.from_labels(used)
    if summarise:
        report = ", ".join(f"{k} {v:.3g}" for k, v in cluster_size_report(in_use).items())
        rank_zero_info(f"caption clusters over {len(used)} training captions: {report}")
    eval_labels = _per_image(evaluated, clustering.assigned)
    eval_buckets = _buckets(eval_labels, sizes)
    return CaptionClusters(labels, sizes, eval_labels, eval_buckets, clustering.centres)


def assign_evaluation_clusters(
    clusters: CaptionClusters,
    evaluated: list[Record],
    config: ClusterConfig,
    cache: FeatureCache,
    progress: bool = True,
) -> CaptionClusters:
    """``clusters`` with the captions of ``evaluated`` images that have none yet given their
    nearest cluster and its size bucket, as :func:`cluster_training_captions` gives val's.

    The data module calls it when a split's loader is first built, so the test (report) split is
    read only when it is evaluated; images already assigned are not embedded again.
    """
    todo = [r for r in evaluated if r.image_id not in clusters.eval_labels]
    if not todo or clusters.centres is None:
        return clusters
    captions = [c for r in todo for c in r.captions]
    labels = _per_image(todo, assign_captions(captions, clusters.centres, config, cache, progress))
    return replace(
        clusters,
        eval_labels={**clusters.eval_labels, **labels},
        eval_buckets={**clusters.eval_buckets, **_buckets(labels, clusters.sizes)},
    )


def _buckets(labels: dict[int, np.ndarray], sizes: np.ndarray) -> dict[int, np.ndarray]:
    """Each image's per-caption size bucket: the tercile, over the clusters in use for training,
    of its captions' clusters' training sizes (the terciles need the sizes alone)."""
    in_use = Clustering(labels=np.zeros(0, dtype=np.int64), sizes=sizes[sizes > 0])
    return {image: size_buckets(sizes[assigned], in_use) for image, assigned in labels.items()}


def noisy_split(
    records: list[Record], noise: NoiseConfig | None, train: list[Record]
) -> tuple[list[Record], NoiseConfig | None]:
    """A split's records with ``noise`` applied, and the noise in force (``None``: none at all).

    Replaced words come from the training captions' vocabulary, whichever split is corrupted.
    """
    if noise is None or not noise.active:
        return records, None
    vocabulary = caption_vocabulary(c for r in train for c in r.captions)
    return noisy_records(records, noise, vocabulary), noise


def _per_image(records: list[Record], labels: np.ndarray | None) -> dict[int, np.ndarray]:
    """Split one label per caption (records' captions in order) into one array per image."""
    if labels is None:
        return {}
    out, start = {}, 0
    for r in records:
        out[r.image_id] = labels[start : start + len(r.captions)]
        start += len(r.captions)
    return out
