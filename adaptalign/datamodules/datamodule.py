"""The data module: wires settings, split records, model inputs and loaders together.

Real data (Karpathy JSON, Flickr8k/Flickr30k tokens, CSV, COCO captions) and the built-in generated
data become the same records (:mod:`~adaptalign.datamodules.builder`); the loaders are built in
:mod:`~adaptalign.datamodules.loaders`. Image preprocessing comes from the system being trained
(its image tower's timm data config), so data and model never disagree about input size or
normalisation; a frozen tower's features come from the on-disk feature cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from adaptalign.common.checks import is_int
from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.builder import (
    Format,
    SplitSettings,
    annotation_paths,
    assign_evaluation_clusters,
    build_splits,
    feature_cache,
    noisy_split,
)
from adaptalign.datamodules.clusters import ClusterConfig
from adaptalign.datamodules.curriculum_sampler import CurriculumBatchSampler
from adaptalign.datamodules.datasets import (
    CaptionClusters,
    EvalImages,
    TrainPairs,
    default_transform,
)
from adaptalign.datamodules.frozen_features import FrozenFeatures, compute_frozen_features
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.datamodules.loaders import curriculum_loader, eval_loader, pair_loader
from adaptalign.datamodules.model_inputs import MISSING_LINK, ModelInputs
from adaptalign.datamodules.noise import NoiseConfig
from adaptalign.datamodules.ontology import OntologyConfig
from adaptalign.datamodules.records import Record
from adaptalign.datamodules.resumable import ResumableDataLoader
from adaptalign.datamodules.selection import Selection
from adaptalign.datamodules.shard_curriculum import BufferCurriculum
from adaptalign.datamodules.shard_features import extract_shard_features
from adaptalign.datamodules.shard_loading import (
    evaluation_images,
    is_streamed,
    shard_image_ids,
    shard_keys,
    stream_loader,
)
from adaptalign.datamodules.shard_stream import ShardPairLoader

Split = Literal["train", "val", "test"]


class AlignmentDataModule(L.LightningDataModule):
    """Image-caption data for alignment.

    Args:
        annotations: the annotation file (COCO: a list of ``captions_*.json``); ``None`` uses the
            built-in generated dataset.
        format: ``auto`` detects it from the file; or one of karpathy, flickr8k, flickr30k, csv,
            coco; ``webdataset`` streams pairs from tar shards instead of an annotation file.
        shards, val_shards, test_shards: with ``format: webdataset``, the train, validation and
            (optional) test shards: a brace pattern (``pairs/train-{000000..000099}.tar``) or a
            list of local paths or URLs, in img2dataset's layout (``KEY.jpg`` with ``KEY.txt``
            and/or ``KEY.json`` holding ``caption``). An index pass reads every shard's captions
            once (cached); training streams this process's share of the train shards, disjoint
            across processes and loader workers (see :mod:`~adaptalign.datamodules.shard_stream`).
        shuffle_buffer: streamed pairs shuffled in a buffer of this many (and the window the
            curriculum sampler draws its batches from).
        image_root: folder the file names are relative to (default: each format's usual place).
        val_images, test_images, split_seed: sizes and seed of the split made for formats that
            have none (Flickr30k tokens, CSV, COCO val2014); ``None`` keeps the format's default.
        generated: settings of the generated dataset (used when ``annotations`` is ``None``).
        cache_dir: where generated data and frozen-tower features are kept (default
            ``$ADAPTALIGN_CACHE`` or ``~/.cache/adaptalign``).
        train_images: a low-data subset: a count or a fraction of the train split, nested across
            sizes for one seed; ``captions_per_image`` caps each training image's captions.
        selection_images: select apart from reporting, for data sets with train and val (dev)
            splits only (Flickr8k as distributed): this many train images (a count, or a
            fraction of train) become the ``val`` split that fit validates on, checkpoints and
            early stopping select on; the data set's own val split becomes ``test``, the report
            split, evaluated once on the selected checkpoint after ``fit``. The carve is seeded
            by ``split_seed`` only, so it is the same for every ``seed``, method and
            ``train_images``, whose subsets come from the rest of train. A data set that already
            has a test split is refused: it selects on val and reports on test with
            ``report_split``.
        report_split: ``test`` makes the data set's own test split the report split, evaluated
            once on the checkpoint selected on val after ``fit``; ``none`` never reports (a
            tuning trial, which only selects); ``null`` (the default) reports on ``test`` with
            ``selection_images`` (the relabelled dev) and nothing otherwise. ``val`` is refused:
            it is the split runs are selected on.
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

    Under a trainer, the system's image preprocessing and frozen towers reach the data module as
    :class:`~adaptalign.datamodules.model_inputs.ModelInputs` in ``model_inputs``, handed over by
    the ``ModelInputsLink`` callback (the command line adds it); a data module on its own uses a
    default preprocessing and raw inputs.
    """

    def __init__(
        self,
        annotations: str | list[str] | None = None,
        format: Format = "auto",
        shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        shuffle_buffer: int = 1000,
        image_root: str | None = None,
        val_images: int | None = None,
        test_images: int | None = None,
        split_seed: int = 0,
        generated: GeneratedConfig | None = None,
        cache_dir: str | None = None,
        train_images: int | float | None = None,
        selection_images: int | float | None = None,
        report_split: Literal["test", "none"] | None = None,
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
        if sampler not in ("random", "curriculum"):
            raise ConfigurationError(f"data.sampler={sampler!r}; expected 'random' or 'curriculum'")
        self.annotations = annotations
        self.format = format
        self.shards = shards
        self.val_shards = val_shards
        self.test_shards = test_shards
        if not is_int(shuffle_buffer) or shuffle_buffer < 1:
            raise ConfigurationError(
                f"data.shuffle_buffer={shuffle_buffer!r}; expected an integer >= 1"
            )
        self.shuffle_buffer = shuffle_buffer
        self.image_root = image_root
        self.val_images = val_images
        self.test_images = test_images
        self.split_seed = split_seed
        self.generated = generated or GeneratedConfig()
        self.cache_dir = cache_dir
        self.train_images = train_images
        if report_split not in (None, "test", "none"):
            refusal = " ('val' is the selection split: fit selects its checkpoint on it)"
            raise ConfigurationError(
                f"data.report_split={report_split!r}; expected 'test', 'none' or null"
                + (refusal if report_split == "val" else "")
            )
        self.selection_images = selection_images
        self.report_split = report_split
        self.captions_per_image = captions_per_image
        self.verify_images = verify_images
        self.skip_bad_images = skip_bad_images
        self.feature_cache = feature_cache
        self.clusters = clusters
        self.noise = noise
        self.eval_noise = eval_noise
        self.sampler_name = sampler
        self.ontology = ontology
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.predict_split = predict_split
        self.seed = seed
        # What setup builds from the settings above.
        self.source = ""
        self.records: list[Record] = []
        self.splits: dict[str, list[Record]] = {}
        self.caption_clusters: CaptionClusters | None = None
        self.selection: Selection | None = None  # the split carved by selection_images
        # The system's side, handed over by the ModelInputsLink callback when a trainer sets up.
        self.model_inputs: ModelInputs | None = None
        # Frozen towers' features per (split, noise settings), extracted when the split's loader
        # is first built: a run extracts only the splits and the training subset it uses.
        self._features: dict[tuple[str, str], FrozenFeatures | None] = {}
        # Image bytes of evaluation splits stored in shards, read from them once per split.
        self._shard_images: dict[str, dict[int, bytes]] = {}
        self.train_batch_sampler: CurriculumBatchSampler | None = None
        self.train_loader: ResumableDataLoader | ShardPairLoader | None = None
        self._train_loader_state: dict | None = None  # restored, for the next training loader

    # ------------------------------------------------------------------------ records
    def split_settings(self) -> SplitSettings:
        """The settings that decide the split records, as they are now."""
        tags = self.ontology
        if tags is None and self.sampler_name == "curriculum":
            tags = OntologyConfig()
        return SplitSettings(
            annotations=self.annotations,
            format=self.format,
            shards=self.shards,
            val_shards=self.val_shards,
            test_shards=self.test_shards,
            image_root=self.image_root,
            val_images=self.val_images,
            test_images=self.test_images,
            split_seed=self.split_seed,
            generated=self.generated,
            cache_dir=self.cache_dir,
            train_images=self.train_images,
            selection_images=self.selection_images,
            captions_per_image=self.captions_per_image,
            verify_images=self.verify_images,
            skip_bad_images=self.skip_bad_images,
            ontology=tags,
            clusters=self.clusters,
            seed=self.seed,
        )

    def annotation_paths(self) -> list[Path]:
        """The annotation files (the generated dataset's, generated first, when none are set)."""
        return annotation_paths(self.split_settings())

    def prepare_data(self) -> None:
        """Generate the data and fill the caption-cluster cache; nothing is kept on the module.

        It runs on one process per machine before the others set up, so they then read the
        clustering from the cache. Under a one-process trainer ``setup`` follows in this same
        process and fills the cache itself, so the records are read and checked once only.
        """
        settings = self.split_settings()
        annotation_paths(settings)
        if self.clusters is not None and (self.trainer is None or self.trainer.world_size > 1):
            build_splits(settings, summarise=False)  # setup logs the summaries

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        built = build_splits(self.split_settings())
        self.source, self.records = built.source, built.records
        self.caption_clusters = built.caption_clusters
        self.selection = built.selection
        self.splits = built.splits
        if self.reports_on is not None and not self.splits.get(self.reports_on):
            raise ConfigurationError(
                f"data.report_split={self.reports_on}: {self.source} has no {self.reports_on} "
                "split to report on; expected a data set with one (data.test_images, "
                "data.generated.num_test) or a selection split carved from train "
                "(data.selection_images)"
            )

    @property
    def reports_on(self) -> str | None:
        """The report split, evaluated once after fit on the checkpoint selected on val:
        ``test`` with ``report_split: test`` or a carved selection split, unless ``none``."""
        if self.report_split == "none":
            return None
        return "test" if self.selection_images is not None or self.report_split else None

    def report_splits(self) -> dict[str, Any] | None:
        """Which splits a run was selected and reported on, for its summary and comparisons."""
        if self.selection is not None:
            return self.selection.as_dict()
        if self.reports_on is None or not self.splits:
            return None
        return {
            "selected_on": "val",
            "selection_images": len(self.splits.get("val", [])),
            "reported_on": self.reports_on,
            "report_images": len(self.splits[self.reports_on]),
            "report_source": f"the data set's {self.reports_on} split",
        }

    @property
    def cluster_sizes(self) -> np.ndarray | None:
        """Sizes of the clusters present in the training data (what MM-TS shifts are scaled by)."""
        if self.caption_clusters is None:
            return None
        sizes = self.caption_clusters.sizes
        return sizes[sizes > 0]

    def _records(self, split: str) -> list[Record]:
        records = self.splits.get(split, [])
        if not records:
            raise DatasetFormatError(f"split {split!r} of {self.source} has no images")
        return records

    # ------------------------------------------------------------------- model inputs
    def _model_inputs(self) -> ModelInputs:
        """The system's inputs; on its own a default preprocessing, under a trainer an error
        unless the link callback handed them over."""
        if self.model_inputs is not None:
            return self.model_inputs
        if self.trainer is not None:
            raise ConfigurationError(MISSING_LINK)
        return ModelInputs(default_transform())

    def _frozen_features(
        self, records: list[Record], image_noise: NoiseConfig | None, training: bool = False
    ) -> FrozenFeatures | None:
        """Frozen towers' features of ``records`` (noisy ones with ``image_noise``), computed by
        process 0 for the items the cache lacks; augmented training images are left raw."""
        inputs = self._model_inputs()
        if training and inputs.train_transform is not None and inputs.image_tower is not None:
            cut = inputs.image_tower.cut
            what = f"frozen prefix (below {cut})" if cut else "frozen features"
            rank_zero_warn(
                f"model.image_tower.augment=true: augmented training images differ every epoch, "
                f"so the image tower's {what} cannot be cached for them and is recomputed at "
                "every training step; evaluation still reads the cache"
            )
            inputs = replace(inputs, image_tower=None)
        towers = (inputs.image_tower, inputs.text_backbone, inputs.text_prefix)
        if not self.feature_cache or all(tower is None for tower in towers):
            return None
        trainer = self.trainer
        writer = trainer is None or trainer.is_global_zero
        barrier = trainer.strategy.barrier if trainer is not None else lambda: None
        shard_images = None
        if is_streamed(records) and inputs.image_tower is not None:
            # Images in shards: each process extracts its own shards' features, one chunk each.
            rank, world = self._world()
            shards, keys = shard_keys(records)
            shard_images = extract_shard_features(
                shards,
                keys,
                inputs,
                feature_cache(self.cache_dir),
                rank=rank,
                world=world,
                barrier=barrier,
                progress=writer,
                image_noise=image_noise,
                image_ids=shard_image_ids(records),
            )
            inputs = replace(inputs, image_tower=None)
        features = compute_frozen_features(
            inputs,
            records,
            feature_cache(self.cache_dir),
            num_workers=self.num_workers,
            progress=writer,
            barrier=barrier,
            is_writer=writer,
            image_noise=image_noise,
        )
        features.shard_images = shard_images
        if shard_images is not None and not training:  # evaluation looks its rows up by image
            features.image = {r.image_id: shard_images[(r.shard, r.key)] for r in records}
        return features

    def _split_inputs(
        self, split: str, noise: NoiseConfig | None
    ) -> tuple[list[Record], FrozenFeatures | None, NoiseConfig | None]:
        """A split's records and frozen features, with the given noise (if any) applied."""
        records, noise = noisy_split(self._records(split), noise, self.splits["train"])
        if noise is not None:
            rank_zero_info(f"{split} split with noise {noise}")
        key = (split, repr(noise))
        if key not in self._features:
            self._features[key] = self._frozen_features(records, noise, split == "train")
        return records, self._features[key], noise

    # ------------------------------------------------------------------------ loaders
    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> ResumableDataLoader | ShardPairLoader:
        records, features, noise = self._split_inputs("train", self.noise)
        rank, world = self._world()
        if len(records) < self.batch_size * world:
            raise ConfigurationError(
                f"the train split has {len(records)} images, fewer than one global batch "
                f"(data.batch_size={self.batch_size} x {world} processes)"
            )
        inputs = self._model_inputs()
        dataset = TrainPairs(
            records,
            inputs.train_transform or inputs.transform,
            seed=self.seed,
            features=features,
            clusters=self.caption_clusters,
            image_noise=noise,
        )
        trainer = self.trainer
        epoch_source = (lambda: trainer.current_epoch) if trainer is not None else None
        settings = {"seed": self.seed, "num_workers": self.num_workers}
        if is_streamed(records):
            loader = self._stream_loader(dataset, rank, world, epoch_source)
        elif self.sampler_name == "curriculum":
            loader = curriculum_loader(
                dataset,
                self.batch_size,
                rank,
                world,
                min_pairs=(self.ontology or OntologyConfig()).min_pairs,
                epoch=trainer.current_epoch if trainer is not None else 0,
                epoch_source=epoch_source,
                **settings,
            )
            self.train_batch_sampler = loader.batch_sampler
        else:
            loader = pair_loader(
                dataset, self.batch_size, rank, world, epoch_source=epoch_source, **settings
            )
        if self._train_loader_state is not None:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self.train_loader = loader
        return loader

    def _stream_loader(
        self,
        dataset: TrainPairs,
        rank: int,
        world: int,
        epoch_source: Callable[[], int] | None,
    ) -> ShardPairLoader:
        """Training batches streamed from the shards: images, or their cached features."""
        curriculum = None
        if self.sampler_name == "curriculum":
            min_pairs = (self.ontology or OntologyConfig()).min_pairs
            curriculum = BufferCurriculum(self.shuffle_buffer, min_pairs=min_pairs)
        features = dataset.features
        shard_images = features.shard_images if features is not None else None
        loader = stream_loader(
            dataset,
            self.batch_size,
            rank,
            world,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            skip_bad=self.skip_bad_images,
            num_workers=self.num_workers,
            epoch_source=epoch_source,
            curriculum=curriculum,
            read_shard=shard_images.read_shard if shard_images is not None else None,
        )
        rank_zero_info(loader.plan().describe())
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

    def _eval_loader(self, split: str, shard: bool = True) -> DataLoader:
        records, features, noise = self._split_inputs(split, self.eval_noise)
        image_bytes = None
        if is_streamed(records) and (features is None or features.image is None):
            if split not in self._shard_images:  # clean bytes: every noise setting shares them
                self._shard_images[split] = evaluation_images(records)
            image_bytes = self._shard_images[split]
        dataset = EvalImages(
            records,
            self._model_inputs().transform,
            features=features,
            clusters=self._evaluation_clusters(split),
            image_noise=noise,
            image_bytes=image_bytes,
        )
        rank, world = self._world()
        return eval_loader(
            dataset, self.eval_batch_size, rank, world, num_workers=self.num_workers, shard=shard
        )

    def _evaluation_clusters(self, split: str) -> CaptionClusters | None:
        """The caption clusters with ``split``'s clean captions assigned: setup assigns val's
        only, so the test (report) split is read when it is evaluated, after selection."""
        if self.caption_clusters is not None and self.clusters is not None:
            self.caption_clusters = assign_evaluation_clusters(
                self.caption_clusters,
                self._records(split),
                self.clusters,
                feature_cache(self.cache_dir),
                progress=self.trainer is None or self.trainer.is_global_zero,
            )
        return self.caption_clusters

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        # Not sharded: the embedding writer stores the whole split from one process.
        return self._eval_loader(self.predict_split, shard=False)
