"""The data module: where records come from, how they are split, batched and preprocessed.

Real data (Karpathy JSON, Flickr8k/Flickr30k tokens, CSV, COCO captions) and the built-in generated
data become the same records. Image preprocessing comes from the system being trained (its image
tower's timm data config) when one is attached, so data and model never disagree about input size
or normalisation; a frozen tower's features come from the on-disk feature cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler

from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.clusters import (
    ClusterConfig,
    Clustering,
    cluster_captions,
    cluster_size_report,
    plot_cluster_sizes,
    size_buckets,
)
from adaptalign.datamodules.curriculum_sampler import CurriculumBatchSampler
from adaptalign.datamodules.datasets import (
    CaptionClusters,
    EvalImages,
    PairSampler,
    TrainPairs,
    Transform,
    collate_eval,
    collate_pairs,
    default_transform,
)
from adaptalign.datamodules.feature_cache import FeatureCache
from adaptalign.datamodules.formats import read_dataset
from adaptalign.datamodules.frozen_features import FrozenFeatures, compute_frozen_features
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
from adaptalign.datamodules.resumable import ResumableDataLoader
from adaptalign.datamodules.subsets import cap_captions, nested_subset

Split = Literal["train", "val", "test"]
Format = Literal["auto", "karpathy", "flickr8k", "flickr30k", "csv", "coco"]


class AlignmentDataModule(L.LightningDataModule):
    """Image-caption data for alignment.

    Args:
        annotations: the annotation file (COCO: a list of ``captions_*.json``); ``None`` uses the
            built-in generated dataset.
        format: ``auto`` detects it from the file; or one of karpathy, flickr8k, flickr30k, csv,
            coco.
        image_root: folder the file names are relative to (default: each format's usual place).
        val_images, test_images, split_seed: sizes and seed of the split made for formats that
            have none (Flickr30k tokens, CSV, COCO val2014); ``None`` keeps the format's default.
        generated: settings of the generated dataset (used when ``annotations`` is ``None``).
        cache_dir: where generated data and frozen-tower features are kept (default
            ``$ADAPTALIGN_CACHE`` or ``~/.cache/adaptalign``).
        train_images: a low-data subset: a count or a fraction of the train split, nested across
            sizes for one seed; ``captions_per_image`` caps each training image's captions.
        verify_images: fully decode every image once before training (finds truncated files).
        skip_bad_images: leave out missing or unreadable images (logged) instead of failing.
        feature_cache: serve frozen towers' features from the cache instead of raw inputs.
        clusters: long-tail caption clusters (SentenceBERT + k-means over the train split's
            captions, cached); each training pair then carries ``cluster`` and ``cluster_size``
            (counted over the captions actually trained on), as MM-TS schedules need.
        noise, eval_noise: caption and image noise of the training split, and of the evaluation
            and predict splits (the robustness stress test sets the latter per rate). Each
            corrupts the data once, the same way in every epoch, so frozen towers' features of
            the noisy data are cached like clean ones.
        sampler: ``random`` shuffles pairs; ``curriculum`` builds object-diverse and same-object
            batches (the share of same-object batches is set by the ``ObjectCurriculum``
            callback) from each pair's ontology tags; under DDP it shards the batches itself, so
            the trainer needs ``use_distributed_sampler: false``.
        ontology: the vocabulary that tags training pairs with the objects their captions name
            (default: the built-in everyday vocabulary; generated data keeps its true objects).
        batch_size: training pairs per batch on each process; ``eval_batch_size``: images per
            evaluation batch (each with all its captions).
        predict_split: the split ``predict`` embeds.
        seed: drives the subset, shuffling and the per-epoch caption choice.

    The training loader's position within the epoch is part of the data module's state (and so
    of every checkpoint): a run resumed from a checkpoint saved mid-epoch trains on the rest of
    that epoch's batches, not on the epoch again from its start.
    """

    def __init__(
        self,
        annotations: str | list[str] | None = None,
        format: Format = "auto",
        image_root: str | None = None,
        val_images: int | None = None,
        test_images: int | None = None,
        split_seed: int = 0,
        generated: GeneratedConfig | None = None,
        cache_dir: str | None = None,
        train_images: int | float | None = None,
        captions_per_image: int | None = None,
        verify_images: bool = False,
        skip_bad_images: bool = False,
        feature_cache: bool = True,
        clusters: ClusterConfig | None = None,
        noise: NoiseConfig | None = None,
        eval_noise: NoiseConfig | None = None,
        sampler: Literal["random", "curriculum"] = "random",
        ontology: OntologyConfig | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        predict_split: Split = "test",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 2:
            raise ConfigurationError(
                f"data.batch_size={batch_size}; expected >= 2 (a contrastive batch needs negatives)"
            )
        self.annotations = annotations
        self.format = format
        self.image_root = image_root
        self.val_images = val_images
        self.test_images = test_images
        self.split_seed = split_seed
        self.generated = generated or GeneratedConfig()
        self.cache_dir = cache_dir
        self.train_images = train_images
        self.captions_per_image = captions_per_image
        self.verify_images = verify_images
        self.skip_bad_images = skip_bad_images
        self.feature_cache = feature_cache
        self.clusters = clusters
        self.noise = noise
        self.eval_noise = eval_noise
        if sampler not in ("random", "curriculum"):
            raise ConfigurationError(f"data.sampler={sampler!r}; expected 'random' or 'curriculum'")
        self.sampler_name = sampler
        self.train_batch_sampler: CurriculumBatchSampler | None = None
        self.train_loader: ResumableDataLoader | None = None
        self._train_loader_state: dict | None = None  # restored, for the next training loader
        self.ontology = ontology
        # Frozen towers' features per (split, noise settings), extracted when the split's loader
        # is first built: a run extracts only the splits and the training subset it uses.
        self._features: dict[tuple[str, str], FrozenFeatures | None] = {}
        self.caption_clusters: CaptionClusters | None = None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.predict_split = predict_split
        self.seed = seed
        self.records: list[Record] = []
        self.splits: dict[str, list[Record]] = {}
        self.source = ""

    def annotation_paths(self) -> list[Path]:
        if self.annotations is None:
            return [generate_dataset(self.generated, self.cache_dir)]
        given = [self.annotations] if isinstance(self.annotations, str) else self.annotations
        paths = [Path(p).expanduser() for p in given]
        for path in paths:
            if not path.is_file():
                raise ConfigurationError(f"data.annotations: {str(path)!r} does not exist")
        return paths

    def prepare_data(self) -> None:
        """Runs on one process per machine first: generate data, and fill the cluster cache."""
        self.annotation_paths()
        if self.clusters is not None:
            self.setup()  # the other processes then find the clustering cached

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        paths = self.annotation_paths()
        self.source = ", ".join(str(p) for p in paths)
        records = read_dataset(
            [str(p) for p in paths] if len(paths) > 1 else str(paths[0]),
            format="karpathy" if self.annotations is None else self.format,
            image_root=self.image_root,
            val_images=self.val_images,
            test_images=self.test_images,
            split_seed=self.split_seed,
        )
        self.records = check_images(
            records, decode=self.verify_images, skip_bad=self.skip_bad_images, source=self.source
        )
        splits = {n: [r for r in self.records if r.split == n] for n in ("train", "val", "test")}
        train = nested_subset(splits["train"], self.train_images, self.seed)
        splits["train"] = cap_captions(train, self.captions_per_image)
        if self.sampler_name == "curriculum" or self.ontology is not None:
            config = self.ontology or OntologyConfig()
            image_tags = None
            if config.image_tags is not None:
                by_name = load_image_tags(config.image_tags)
                image_tags = {
                    r.image_id: by_name[r.image_path.name]
                    for r in splits["train"]
                    if r.image_path.name in by_name
                }
            ontology = Ontology.from_config(config)
            splits["train"], summary = ontology.prepare(splits["train"], image_tags)
            rank_zero_info(f"ontology tags: {format_summary(summary)}")
        if self.clusters is not None:
            self.caption_clusters = self._cluster(splits["train"], splits["val"] + splits["test"])
        self.splits = splits

    @property
    def cluster_sizes(self) -> np.ndarray | None:
        """Sizes of the clusters present in the training data (what MM-TS shifts are scaled by)."""
        if self.caption_clusters is None:
            return None
        sizes = self.caption_clusters.sizes
        return sizes[sizes > 0]

    def _cluster(self, train: list[Record], evaluated: list[Record]) -> CaptionClusters:
        """Cluster every caption of the train split once; count sizes over the captions in use.

        Evaluation captions join the cluster of their nearest centroid, so recall can be reported
        for head, middle and tail queries by the tercile of that cluster's training size.
        """
        full = [r for r in self.records if r.split == "train"]
        clustering = cluster_captions(
            [c for r in full for c in r.captions],
            self.clusters,
            FeatureCache(self.cache_dir or default_cache_dir()),
            assign=[c for r in evaluated for c in r.captions],
        )
        labels = _per_image(full, clustering.labels)
        used = np.concatenate([labels[r.image_id][: len(r.captions)] for r in train])
        sizes = np.bincount(used, minlength=len(clustering.sizes))
        in_use = Clustering.from_labels(used)
        report = ", ".join(f"{k} {v:.3g}" for k, v in cluster_size_report(in_use).items())
        rank_zero_info(f"caption clusters over {len(used)} training captions: {report}")
        # Only process 0 plots. ``trainer.log_dir`` is a collective under DDP, and this also runs
        # from ``prepare_data``, which the other processes wait out at a barrier: ask the logger.
        logger = self.trainer.logger if self.trainer is not None else None
        log_dir = logger.log_dir if logger is not None and self.trainer.is_global_zero else None
        if log_dir is not None:
            path = plot_cluster_sizes(in_use, Path(log_dir) / "cluster_sizes.png")
            rank_zero_info(f"cluster-size plot: {path}")
        eval_labels = _per_image(evaluated, clustering.assigned)
        eval_buckets = {
            image_id: size_buckets(sizes[assigned], in_use)
            for image_id, assigned in eval_labels.items()
        }
        return CaptionClusters(labels, sizes, eval_labels, eval_buckets)

    def _records(self, split: str) -> list[Record]:
        records = self.splits.get(split, [])
        if not records:
            raise DatasetFormatError(f"split {split!r} of {self.source} has no images")
        return records

    def _frozen_features(
        self, records: list[Record], image_noise: NoiseConfig | None = None
    ) -> FrozenFeatures | None:
        """Frozen towers' features of ``records`` (noisy ones with ``image_noise``), computed by
        rank 0 for the items the cache lacks."""
        if not self.feature_cache or self.trainer is None:
            return None
        return compute_frozen_features(
            self.trainer.lightning_module,
            records,
            FeatureCache(self.cache_dir or default_cache_dir()),
            self.image_transform(training=False),
            num_workers=self.num_workers,
            progress=self.trainer.is_global_zero,
            barrier=self.trainer.strategy.barrier,
            is_writer=self.trainer.is_global_zero,
            image_noise=image_noise,
        )

    def _split_inputs(
        self, split: str, noise: NoiseConfig | None
    ) -> tuple[list[Record], FrozenFeatures | None, NoiseConfig | None]:
        """A split's records and frozen features, with the given noise (if any) applied."""
        records = self._records(split)
        if noise is not None and not noise.active:
            noise = None
        if noise is not None:
            vocabulary = caption_vocabulary(c for r in self.splits["train"] for c in r.captions)
            records = noisy_records(records, noise, vocabulary)
            rank_zero_info(f"{split} split with noise {noise}")
        key = (split, repr(noise))
        if key not in self._features:
            self._features[key] = self._frozen_features(records, noise)
        return records, self._features[key], noise

    def image_transform(self, training: bool) -> Transform:
        module = self.trainer.lightning_module if self.trainer is not None else None
        make = getattr(module, "image_transform", None)
        return make(training) if callable(make) else default_transform()

    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> ResumableDataLoader:
        records, features, noise = self._split_inputs("train", self.noise)
        rank, world = self._world()
        if len(records) < self.batch_size * world:
            raise ConfigurationError(
                f"the train split has {len(records)} images, fewer than one global batch "
                f"(data.batch_size={self.batch_size} x {world} processes)"
            )
        dataset = TrainPairs(
            records,
            self.image_transform(training=False),
            seed=self.seed,
            features=features,
            clusters=self.caption_clusters,
            image_noise=noise,
        )
        if self.sampler_name == "curriculum":
            return self._curriculum_loader(dataset, rank, world)
        sampler = PairSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return self._resumable(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
        )

    def _resumable(self, dataset: TrainPairs, **kwargs: object) -> ResumableDataLoader:
        """The training loader, continuing the epoch a restored checkpoint stopped in.

        Its own random generator seeds the workers, so starting an iteration never draws from
        the global generator: a resumed run's dropout and other draws stay those of the run it
        continues. An iteration's epoch is the trainer's, which tells a resumed epoch from the
        next one even where a sampler's own epoch is not advanced (the curriculum sampler
        without its callback).
        """
        trainer = self.trainer
        loader = ResumableDataLoader(
            dataset,
            num_workers=self.num_workers,
            collate_fn=collate_pairs,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
            epoch_source=(lambda: trainer.current_epoch) if trainer is not None else None,
            **kwargs,
        )
        if self._train_loader_state is not None:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self.train_loader = loader
        return loader

    def state_dict(self) -> dict:
        """Where the training loader is within its epoch (Lightning stores it in checkpoints)."""
        if self.train_loader is None:
            return {}
        return {"train_loader": self.train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Hand a checkpoint's loader position to the training loader, built now or later.

        Lightning restores the data module before the trainer builds the training loader (but
        after it, for strategies that restore late), and it skips its own restore of loader
        states when the optimiser asked for the number of steps first, as this project's does.
        """
        state = state_dict.get("train_loader")
        if state is None:
            return
        self._train_loader_state = dict(state)
        if self.train_loader is not None:
            self.train_loader.load_state_dict(state)

    def _curriculum_loader(self, dataset: TrainPairs, rank: int, world: int) -> ResumableDataLoader:
        """Batches from the curriculum sampler, which shards each global batch over ranks."""
        if world > 1 and self._lightning_shards():
            raise ConfigurationError(
                "data.sampler='curriculum' shards batches itself; set "
                "trainer.use_distributed_sampler: false"
            )
        config = self.ontology or OntologyConfig()
        sampler = CurriculumBatchSampler(
            [r.objects for r in dataset.records],
            self.batch_size,
            num_replicas=world,
            rank=rank,
            seed=self.seed,
            min_pairs=config.min_pairs,
            epoch=self.trainer.current_epoch if self.trainer is not None else 0,
        )
        self.train_batch_sampler = sampler
        return self._resumable(dataset, batch_sampler=sampler)

    def _eval_loader(self, split: str, shard: bool = True) -> DataLoader:
        records, features, noise = self._split_inputs(split, self.eval_noise)
        dataset = EvalImages(
            records,
            self.image_transform(training=False),
            features=features,
            clusters=self.caption_clusters,
            image_noise=noise,
        )
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=self._eval_shard(dataset) if shard else None,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_eval,
        )

    def _eval_shard(self, dataset: EvalImages) -> DistributedSampler | None:
        """This process's share of an evaluation split when the trainer does not shard it.

        The curriculum sampler needs ``use_distributed_sampler: false``, which also stops Lightning
        from splitting validation; without this every process would score the whole split. The
        padding duplicates the sampler adds are dropped by the retrieval metric.
        """
        rank, world = self._world()
        if world == 1 or self._lightning_shards():
            return None
        return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)

    def _lightning_shards(self) -> bool:
        """Whether the trainer adds DistributedSamplers itself (``use_distributed_sampler``)."""
        connector = getattr(self.trainer, "_accelerator_connector", None)
        return bool(getattr(connector, "use_distributed_sampler", False))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        # Not sharded: the embedding writer stores the whole split from one process.
        return self._eval_loader(self.predict_split, shard=False)


def _per_image(records: list[Record], labels: np.ndarray | None) -> dict[int, np.ndarray]:
    """Split one label per caption (records' captions in order) into one array per image."""
    if labels is None:
        return {}
    out, start = {}, 0
    for r in records:
        out[r.image_id] = labels[start : start + len(r.captions)]
        start += len(r.captions)
    return out
