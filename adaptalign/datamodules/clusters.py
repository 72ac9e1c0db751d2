"""Caption clusters and their sizes, so temperature schedules can treat rare concepts differently.

Captions are embedded with a sentence-transformers model and grouped by k-means; a caption's
cluster size says how common its concept is in the data (head) or how rare (tail). The clustering
depends only on the training captions themselves (each distinct caption, weighted by how often it
occurs), never on their order or on the machine: k-means sees the distinct captions in sorted
order with a fixed seed on one thread, and clusters are numbered by size. (faiss on a GPU is the
exception; its labels are cached apart from the CPU's.)

Embeddings are the per-caption rows of the feature cache, the same rows a frozen text tower of the
same model reads (so that model encodes each caption once); the labels are a cache entry of their
own, so a repeated run encodes nothing and a new ``num_clusters`` re-runs only k-means.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from adaptalign.common.checks import is_int
from adaptalign.common.errors import ConfigurationError
from adaptalign.common.figures import new_figure, save_png
from adaptalign.common.progress import say
from adaptalign.datamodules.feature_cache import FeatureCache, digest, text_digest
from adaptalign.datamodules.frozen_features import caption_features, text_model_key
from adaptalign.encoders.text_models import DEFAULT_MAX_TOKENS, load_text_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

Backend = Literal["auto", "sklearn", "faiss"]
Algorithm = Literal["sklearn-kmeans", "sklearn-minibatch", "faiss", "faiss-gpu"]
BACKENDS = ("auto", "sklearn", "faiss")

# Above this many captions full k-means gets slow on a CPU (30,000 MiniLM captions, k=200: 48 s on
# two cores); mini-batches with a short refinement took about half that.
MINIBATCH_ABOVE = 20_000
# Above this many captions "auto" prefers faiss when it is installed.
FAISS_ABOVE = 50_000
# Captions are short; the text tower's token budget keeps embeddings comparable with training, and
# the same budget lets clusters share the frozen text tower's cached rows.
MAX_TOKENS = DEFAULT_MAX_TOKENS
# Full k-means passes that polish mini-batch centres.
REFINE_ITERATIONS = 20
# faiss k-means passes (its default). On 1 million synthetic caption embeddings and k = 1,000
# (benchmarks/bench_kmeans_scale.py), 50 passes lowered the inertia by less than 0.01 %.
FAISS_ITERATIONS = 25
# faiss trains on a random sample of this many captions per cluster (its default, 256,000 of a
# million at k = 1,000) and then assigns every caption; training on all of them lowered the
# inertia by 0.3 % for four times the time.
FAISS_POINTS_PER_CLUSTER = 256
# Bump when the clustering procedure changes, so labels cached by an older one are not reused.
# 2: distinct captions in sorted order, numbering by size with ties by that order, one thread.
# 3: faiss starts from k-means++ (0.65 % lower inertia than its random start at 1M x 1,000).
LABELS_VERSION = "3"
# Where the settings below live on the command line and in configs, for error messages.
SETTING = "data.clusters"


@dataclass
class ClusterConfig:
    """How many clusters, which text model embeds the captions, and how k-means runs."""

    num_clusters: int = 200
    text_model: str = "all-MiniLM-L6-v2"
    seed: int = 0
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        value = self.num_clusters
        if not is_int(value) or value < 1:
            raise ConfigurationError(f"{SETTING}.num_clusters={value!r}; expected an integer >= 1")
        if self.backend not in BACKENDS:
            raise ConfigurationError(
                f"{SETTING}.backend={self.backend!r}; expected one of {', '.join(BACKENDS)}"
            )


@dataclass
class Clustering:
    """One cluster label per caption and one size per cluster.

    Labels are numbered by decreasing cluster size, so label 0 is the largest cluster and the
    numbering does not depend on the k-means implementation's order.
    """

    labels: np.ndarray
    sizes: np.ndarray
    assigned: np.ndarray | None = None
    # Unit-length centre of each cluster, kept so captions seen later can join their nearest one.
    centres: torch.Tensor | None = None

    @classmethod
    def from_labels(cls, labels: np.ndarray) -> Clustering:
        """Renumber arbitrary labels by decreasing size (ties by first appearance); empty clusters
        disappear."""
        raw = np.asarray(labels, dtype=np.int64)
        numbered = by_size(raw, np.ones(raw.size))
        return cls(labels=numbered, sizes=np.bincount(numbered).astype(np.int64))

    def size_of(self, labels: np.ndarray) -> np.ndarray:
        """The size of each given label's cluster (how common that caption's concept is)."""
        return self.sizes[np.asarray(labels, dtype=np.int64)]


def faiss_available() -> bool:
    """faiss is importable and new enough (1.14) to start k-means from k-means++."""
    return importlib.util.find_spec("faiss") is not None and _faiss_has_kmeans_plus_plus()


@functools.cache
def _faiss_has_kmeans_plus_plus() -> bool:
    import faiss

    return hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS")


def faiss_gpus() -> int:
    """GPUs a faiss build with GPU support sees; 0 for faiss-cpu."""
    import faiss

    return int(faiss.get_num_gpus())


def resolve_backend(backend: Backend, num_captions: int) -> Algorithm:
    """The k-means implementation a run uses; it is part of the cache key for the labels.

    faiss runs on a GPU when its build sees one ("faiss-gpu"): the same procedure, but other
    arithmetic, so its labels are cached apart from the CPU's.
    """
    if backend == "faiss" and not faiss_available():
        problem = "is not installed" if importlib.util.find_spec("faiss") is None else "is older"
        raise ConfigurationError(
            f"clusters.backend='faiss' but faiss {problem}; install faiss-cpu or faiss-gpu "
            ">= 1.14, or use backend 'sklearn' or 'auto'"
        )
    if backend == "faiss" or (
        backend == "auto" and num_captions > FAISS_ABOVE and faiss_available()
    ):
        return "faiss-gpu" if faiss_gpus() > 0 else "faiss"
    return "sklearn-minibatch" if num_captions > MINIBATCH_ABOVE else "sklearn-kmeans"


def embed_captions(
    model: nn.Module, captions: Sequence[str], cache: FeatureCache | None, progress: bool
) -> torch.Tensor:
    """Unit-length embeddings, so k-means' Euclidean distance ranks like cosine similarity."""
    rows = caption_features(model, captions, cache, progress, desc="caption clusters: encoding")
    return torch.nn.functional.normalize(rows, dim=1)


def run_kmeans(
    embeddings: np.ndarray, weights: np.ndarray, k: int, seed: int, algorithm: Algorithm
) -> np.ndarray:
    """Raw k-means labels of distinct captions; ``weights`` counts each one's repeats.

    One thread: k-means sums its points per thread and then adds the partial sums, so its last
    bits (and, through ties, its labels) would follow the machine's core count. On 30,000 unit
    vectors of 384 dimensions and k = 200 one thread took 19 s against 67 s for two on the busy
    2-core development machine. faiss too: with two threads its centres came out the same on a
    million points, but one point at a near tie joined another cluster, and numbering by size then
    renamed 1,645 points. One thread clustered that million (k = 1,000) in 95 s of CPU time.
    """
    with threadpool_limits(limits=1):
        return _kmeans(embeddings, weights, k, seed, algorithm)


def _kmeans(
    embeddings: np.ndarray, weights: np.ndarray, k: int, seed: int, algorithm: Algorithm
) -> np.ndarray:
    if algorithm in ("faiss", "faiss-gpu"):
        return _faiss_kmeans(embeddings, weights, k, seed, gpu=algorithm == "faiss-gpu")
    from sklearn.cluster import KMeans, MiniBatchKMeans

    # One k-means++ start: on 20,000 MiniLM captions and k=200 a second start lowered the inertia
    # by 0.04% for twice the time.
    init: str | np.ndarray = "k-means++"
    if algorithm == "sklearn-minibatch":
        sketch = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1, batch_size=4096)
        init = sketch.fit(embeddings, sample_weight=weights).cluster_centers_
    # Mini-batch centres are rough and leave stray tiny clusters; a few full passes from them
    # reached a lower inertia than full k-means from scratch, in a tenth of its time.
    model = KMeans(
        n_clusters=k,
        init=init,
        n_init=1,
        max_iter=REFINE_ITERATIONS if algorithm == "sklearn-minibatch" else 300,
        random_state=seed,
    )
    return model.fit_predict(embeddings, sample_weight=weights).astype(np.int64)


def _faiss_kmeans(
    embeddings: np.ndarray, weights: np.ndarray, k: int, seed: int, gpu: bool
) -> np.ndarray:
    """faiss k-means from a k-means++ start on a sample of ``FAISS_POINTS_PER_CLUSTER`` captions
    per cluster, then every caption assigned to its nearest centre.

    The random start faiss uses by default left 0.65 % more inertia on a million points and
    k = 1,000, for about the time of one pass. A GPU build runs on this process's CUDA device, so
    ranks of a multi-GPU run do not all load the first one.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    params = faiss.ClusteringParameters()
    params.niter = FAISS_ITERATIONS
    params.seed = seed
    params.max_points_per_centroid = FAISS_POINTS_PER_CLUSTER
    params.init_method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    index = faiss.IndexFlatL2(x.shape[1])
    if gpu:
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        index = faiss.index_cpu_to_gpus_list(index, gpus=[device])
    clustering = faiss.Clustering(x.shape[1], k, params)
    clustering.train(x, index, np.ascontiguousarray(weights, dtype=np.float32))
    # after training the index holds the final centres
    _, nearest = index.search(x, 1)
    return nearest[:, 0].astype(np.int64)


def by_size(raw: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Raw labels renumbered by decreasing weighted size, ties by each label's first position
    (for distinct captions: the first caption in sorted order); no label is left empty."""
    ids, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    sizes = np.bincount(inverse, weights=weights)
    order = np.lexsort((first, -sizes))
    remap = np.empty(ids.size, dtype=np.int64)
    remap[order] = np.arange(ids.size, dtype=np.int64)
    return remap[inverse]


def cluster_captions(
    captions: Sequence[str],
    config: ClusterConfig,
    cache: FeatureCache | None,
    progress: bool = True,
    assign: Sequence[str] = (),
    keep_centres: bool = False,
) -> Clustering:
    """Cluster captions by meaning; identical captions always share a cluster.

    Each distinct caption is embedded and clustered once, weighted by how often it occurs, which
    is k-means on all captions without the repeated work; the result depends on which captions
    occur how often, not on their order. With a cache, the text model is still loaded (its
    weights are part of the key) but only captions without a cached row are encoded.

    ``assign`` are further captions (evaluation splits) given the cluster of their nearest
    centroid, in ``Clustering.assigned``; they take no part in fitting the clusters.
    ``keep_centres`` keeps the centroids in ``Clustering.centres`` for captions assigned later
    (:func:`assign_captions`), such as a report split read only when it is evaluated.
    """
    captions = list(captions)
    if not captions:
        raise ValueError("no captions to cluster")
    algorithm = resolve_backend(config.backend, len(captions))
    distinct = sorted(set(captions))
    position = {caption: i for i, caption in enumerate(distinct)}
    inverse = np.fromiter((position[c] for c in captions), dtype=np.int64, count=len(captions))
    weights = np.bincount(inverse, minlength=len(distinct)).astype(np.float64)
    k = min(config.num_clusters, len(distinct))
    if k < config.num_clusters:
        log.warning(
            "clusters.num_clusters=%d but only %d distinct captions; using k=%d",
            config.num_clusters,
            len(distinct),
            k,
        )
    model = load_text_model(config.text_model, MAX_TOKENS, f"{SETTING}.text_model")

    @functools.cache  # encoded at most once, and only when the labels or centroids need it
    def embeddings() -> torch.Tensor:
        return embed_captions(model, distinct, cache, progress)

    def labels() -> torch.Tensor:
        points = embeddings().numpy()
        if progress:
            say(f"caption clusters: k-means ({algorithm}), k={k}, {len(distinct)} captions")
        started = time.monotonic()
        raw = run_kmeans(points, weights, k, config.seed, algorithm)
        numbered = by_size(raw, weights)
        if numbered.max() + 1 < k:
            log.info("k-means left %d of %d clusters empty", k - numbered.max() - 1, k)
        if progress:
            say(f"caption clusters: k-means done in {time.monotonic() - started:.0f} s")
        return torch.from_numpy(numbered)

    if cache is None:
        numbered = labels().numpy()
    else:
        key = text_model_key(model)
        numbered = _cached_labels(distinct, weights, config, cache, k, algorithm, key, labels)
    per_caption = numbered[inverse]
    sizes = np.bincount(per_caption).astype(np.int64)
    clustering = Clustering(labels=per_caption, sizes=sizes)
    if assign or keep_centres:
        centres = centroids(embeddings(), per_caption, inverse)
        if keep_centres:
            clustering.centres = centres
        if assign:
            clustering.assigned = nearest_clusters(model, assign, centres, cache, progress)
    return clustering


def nearest_clusters(
    model: nn.Module,
    captions: Sequence[str],
    centres: torch.Tensor,
    cache: FeatureCache | None,
    progress: bool,
) -> np.ndarray:
    """The cluster of each caption's nearest centre; each distinct caption is embedded once."""
    captions = list(captions)
    distinct = sorted(set(captions))
    if not distinct:
        return np.zeros(0, dtype=np.int64)
    nearest = nearest_centroid(embed_captions(model, distinct, cache, progress), centres)
    where = {caption: i for i, caption in enumerate(distinct)}
    return nearest[[where[c] for c in captions]]


def assign_captions(
    captions: Sequence[str],
    centres: torch.Tensor,
    config: ClusterConfig,
    cache: FeatureCache | None,
    progress: bool = True,
) -> np.ndarray:
    """Captions given the cluster of their nearest centre (``Clustering.centres``) after the
    clustering was made, so a split is read only when it is evaluated; the same embedding and
    rule as ``cluster_captions(..., assign=captions)``."""
    model = load_text_model(config.text_model, MAX_TOKENS, f"{SETTING}.text_model")
    return nearest_clusters(model, captions, centres, cache, progress)


def centroids(embeddings: torch.Tensor, labels: np.ndarray, inverse: np.ndarray) -> torch.Tensor:
    """Unit-length mean embedding of each cluster: k-means' own centres, recovered from labels.

    ``embeddings`` are of the distinct captions, ``inverse`` maps each caption to its distinct row
    and ``labels`` gives each caption's cluster, so repeated captions weigh as often as they occur.
    """
    num = int(labels.max()) + 1
    sums = torch.zeros(num, embeddings.shape[1], dtype=embeddings.dtype)
    sums.index_add_(0, torch.as_tensor(labels), embeddings[torch.as_tensor(inverse)])
    return torch.nn.functional.normalize(sums, dim=1)


def nearest_centroid(embeddings: torch.Tensor, centres: torch.Tensor) -> np.ndarray:
    """The cluster whose centre is closest (highest cosine) to each unit-length embedding."""
    return (embeddings @ centres.T).argmax(dim=1).numpy().astype(np.int64)


def _cached_labels(
    distinct: list[str],
    weights: np.ndarray,
    config: ClusterConfig,
    cache: FeatureCache,
    k: int,
    algorithm: Algorithm,
    model_key: str,
    labels: Callable[[], torch.Tensor],
) -> np.ndarray:
    """The distinct captions' labels through the cache, keyed by k, seed, algorithm and the
    captions with their counts."""
    key = digest(
        part.encode()
        for part in (
            f"clusters-v{LABELS_VERSION}",
            f"k={k}",
            f"seed={config.seed}",
            f"algorithm={algorithm}",
            text_digest(distinct),
            ",".join(str(int(w)) for w in weights),
        )
    )
    meta = {"k": k, "seed": config.seed, "algorithm": algorithm, "text_model": config.text_model}
    cached = cache.get_or_compute("clusters", model_key, key, len(distinct), labels, meta)
    return cached.numpy()


def tercile_bounds(sizes: np.ndarray) -> tuple[int, int]:
    """The largest tail size and the largest middle size among clusters.

    Clusters sorted by ascending size are cut into thirds by rank: with ``C`` clusters the tail
    ends at the ``ceil(C/3)``-th smallest size and the middle at the ``ceil(2C/3)``-th. Sizes are
    then compared by value, so equal-sized clusters always land in the same (the lower) bucket.
    """
    ordered = np.sort(np.asarray(sizes, dtype=np.int64))
    count = ordered.size
    if count == 0:
        raise ValueError("a clustering without clusters has no terciles")
    return int(ordered[math.ceil(count / 3) - 1]), int(ordered[math.ceil(2 * count / 3) - 1])


def size_buckets(sizes_per_sample: np.ndarray, clustering: Clustering) -> np.ndarray:
    """0 (tail), 1 (middle) or 2 (head) per sample, by its cluster size's tercile over clusters.

    The terciles follow :func:`tercile_bounds`: a size up to the tail bound is tail, up to the
    middle bound is middle, anything larger is head.
    """
    tail_max, middle_max = tercile_bounds(clustering.sizes)
    sizes = np.asarray(sizes_per_sample, dtype=np.int64)
    return np.where(sizes <= tail_max, 0, np.where(sizes <= middle_max, 1, 2)).astype(np.int64)


def cluster_size_report(clustering: Clustering) -> dict:
    """Numbers that show how long the tail is before choosing a schedule for it."""
    sizes = np.sort(np.asarray(clustering.sizes, dtype=np.int64))[::-1]
    total = int(sizes.sum())
    top = max(1, math.ceil(sizes.size / 10))
    tail_max, middle_max = tercile_bounds(sizes)
    return {
        "num_clusters": int(sizes.size),
        "num_captions": total,
        "min_size": int(sizes[-1]),
        "median_size": float(np.median(sizes)),
        "max_size": int(sizes[0]),
        "top_decile_share": float(sizes[:top].sum() / total),
        "tail_max_size": tail_max,
        "middle_max_size": middle_max,
    }


def cluster_size_figure(sizes: np.ndarray) -> Figure:
    """A rank-size plot on log-log axes: a long tail shows as a long, falling line."""
    sizes = np.sort(np.asarray(sizes, dtype=np.int64))[::-1]
    tail_max, middle_max = tercile_bounds(sizes)
    figure = new_figure(6, 4)
    axes = figure.add_subplot()
    axes.loglog(np.arange(1, sizes.size + 1), sizes, marker=".", linewidth=1)
    axes.axhline(tail_max, color="tab:red", linestyle="--", linewidth=0.8, label="tail bound")
    axes.axhline(middle_max, color="tab:orange", linestyle=":", linewidth=0.8, label="middle bound")
    axes.set_xlabel("cluster rank (largest first)")
    axes.set_ylabel("captions in cluster")
    axes.set_title(f"{sizes.size} caption clusters, {int(sizes.sum())} captions")
    axes.legend()
    figure.tight_layout()
    return figure


def plot_cluster_sizes(sizes: np.ndarray, path: str | Path) -> Path:
    """The rank-size plot of clusters of these sizes, written to ``path`` as PNG."""
    return save_png(cluster_size_figure(sizes), path)
