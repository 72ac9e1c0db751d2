"""Caption clusters: grouping, determinism, caching, reports, size buckets and settings."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules import clusters, frozen_features
from adaptalign.datamodules.clusters import (
    ClusterConfig,
    Clustering,
    cluster_captions,
    cluster_size_report,
    plot_cluster_sizes,
    resolve_backend,
    size_buckets,
)
from adaptalign.datamodules.feature_cache import FeatureCache
from adaptalign.lightning_modules.towers import TextTower, TextTowerConfig
from tests.helpers.captions import some_captions

SENTENCES = ("a red circle", "two blue squares on the left", "a small green star in the corner")


def grouped_captions() -> list[str]:
    """Three obvious groups of 10, 5 and 2 identical captions, interleaved."""
    captions = [SENTENCES[0]] * 10 + [SENTENCES[1]] * 5 + [SENTENCES[2]] * 2
    order = np.random.default_rng(0).permutation(len(captions))
    return [captions[i] for i in order]


def config(model: str, num_clusters: int = 3) -> ClusterConfig:
    return ClusterConfig(num_clusters=num_clusters, text_model=model)


def fail(*_: object, **__: object) -> None:
    raise AssertionError("should have come from the cache")


def test_obvious_groups_and_size_of(tiny_text_model: str) -> None:
    captions = grouped_captions()
    result = cluster_captions(captions, config(tiny_text_model), None, progress=False)
    assert result.labels.dtype == np.int64 and result.sizes.dtype == np.int64
    assert result.labels.shape == (len(captions),)
    per_sentence = [set(result.labels[np.array(captions) == s].tolist()) for s in SENTENCES]
    assert all(len(labels) == 1 for labels in per_sentence)
    assert len(set.union(*per_sentence)) == 3
    assert sorted(result.sizes.tolist()) == [2, 5, 10]
    expected = [captions.count(c) for c in captions]
    assert result.size_of(result.labels).tolist() == expected


@pytest.mark.slow
def test_deterministic_and_cached(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captions = grouped_captions()
    cfg = config(tiny_text_model, num_clusters=2)
    uncached = cluster_captions(captions, cfg, None, progress=False)
    assert np.array_equal(uncached.labels, cluster_captions(captions, cfg, None, False).labels)
    cache = FeatureCache(tmp_path)
    first = cluster_captions(captions, cfg, cache, progress=False)
    assert np.array_equal(first.labels, uncached.labels)
    monkeypatch.setattr(clusters, "embed_captions", fail)
    monkeypatch.setattr(clusters, "run_kmeans", fail)
    again = cluster_captions(captions, cfg, cache, progress=False)
    assert np.array_equal(again.labels, first.labels)
    assert np.array_equal(again.sizes, first.sizes)


def test_new_k_reuses_embeddings(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captions = grouped_captions()
    cache = FeatureCache(tmp_path)
    cluster_captions(captions, config(tiny_text_model, 3), cache, progress=False)
    monkeypatch.setattr(frozen_features, "encode_texts", fail)
    calls: list[int] = []
    real_kmeans = clusters.run_kmeans

    def counted(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        return real_kmeans(*args, **kwargs)

    monkeypatch.setattr(clusters, "run_kmeans", counted)
    two = cluster_captions(captions, config(tiny_text_model, 2), cache, progress=False)
    assert calls == [1] and two.sizes.size == 2 and two.sizes.sum() == len(captions)
    assert len(list((tmp_path / "features" / "clusters").rglob("*.pt"))) == 2


def weighted_captions() -> list[str]:
    """40 distinct captions, the i-th repeated 1 + i % 3 times (79 in all), in a fixed order."""
    return [c for i, c in enumerate(some_captions(40)) for _ in range(1 + i % 3)]


def by_caption(captions: list[str], clustering: Clustering) -> dict[str, int]:
    return dict(zip(captions, clustering.labels.tolist(), strict=True))


@pytest.mark.slow
def test_clusters_depend_only_on_the_captions_not_their_order(tiny_text_model: str) -> None:
    """Shuffled, reversed or regrouped, the same captions get the same labels and sizes."""
    captions = weighted_captions()
    cfg = config(tiny_text_model, num_clusters=6)
    first = cluster_captions(captions, cfg, None, progress=False)
    assert first.sizes.tolist() == sorted(first.sizes.tolist(), reverse=True)
    assert first.sizes.sum() == len(captions) == 79 and first.sizes.size == 6
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(captions))
        shuffled = [captions[i] for i in order]
        other = cluster_captions(shuffled, cfg, None, progress=False)
        assert by_caption(shuffled, other) == by_caption(captions, first)
        assert np.array_equal(other.sizes, first.sizes)


@pytest.mark.slow
def test_cached_labels_are_found_whatever_the_order(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captions = weighted_captions()
    cfg = config(tiny_text_model, num_clusters=4)
    cache = FeatureCache(tmp_path)
    first = cluster_captions(captions, cfg, cache, progress=False)
    monkeypatch.setattr(clusters, "run_kmeans", fail)
    monkeypatch.setattr(frozen_features, "encode_texts", fail)
    again = cluster_captions(captions[::-1], cfg, cache, progress=False)
    assert by_caption(captions[::-1], again) == by_caption(captions, first)
    # Other counts of the same captions are other training data: k-means runs again.
    with pytest.raises(AssertionError, match="from the cache"):
        cluster_captions(captions + captions[:1], cfg, cache, progress=False)


@pytest.mark.slow
def test_clusters_reuse_the_frozen_text_towers_cached_rows(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Captions a frozen text tower of the same model has encoded are not encoded again."""
    captions = weighted_captions()
    cache = FeatureCache(tmp_path)
    tower = TextTower(TextTowerConfig(model_name=tiny_text_model, freeze=True), embed_dim=8)
    # Training captions first, in the data's order, by the frozen tower's own extraction.
    frozen_features.caption_features(tower.backbone, captions[::-1], cache, progress=False)
    plain = cluster_captions(captions, config(tiny_text_model, 4), None, progress=False)
    monkeypatch.setattr(frozen_features, "encode_texts", fail)
    result = cluster_captions(captions, config(tiny_text_model, 4), cache, progress=False)
    assert np.array_equal(result.labels, plain.labels)
    # Another token budget is another model: its rows are not reused.
    other = TextTower(
        TextTowerConfig(model_name=tiny_text_model, freeze=True, max_length=16), embed_dim=8
    )
    monkeypatch.undo()
    calls: list[int] = []
    real = frozen_features.encode_texts

    def counted(backbone: torch.nn.Module, texts: list[str]) -> object:
        calls.append(len(texts))
        return real(backbone, texts)

    monkeypatch.setattr(frozen_features, "encode_texts", counted)
    frozen_features.caption_features(other.backbone, captions, cache, progress=False)
    assert calls == [40]


def test_k_reduced_to_distinct_captions(
    tiny_text_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=clusters.__name__):
        result = cluster_captions(grouped_captions(), config(tiny_text_model, 50), None, False)
    assert sorted(result.sizes.tolist()) == [2, 5, 10]
    assert "only 3 distinct captions; using k=3" in caplog.text


def test_centroids_and_nearest_by_hand() -> None:
    import torch

    # Distinct rows e0, e1, e2; captions [e0, e0, e1, e2] with labels [0, 0, 1, 0].
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    inverse = np.array([0, 0, 1, 2])
    labels = np.array([0, 0, 1, 0])
    centres = clusters.centroids(embeddings, labels, inverse)
    # Cluster 0: e0 + e0 + e2 = (2.6, 0.8), normalised; cluster 1: e1.
    norm = (2.6**2 + 0.8**2) ** 0.5
    assert torch.allclose(centres, torch.tensor([[2.6 / norm, 0.8 / norm], [0.0, 1.0]]))
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0]]), dim=1)
    assert clusters.nearest_centroid(queries, centres).tolist() == [0, 1]


@pytest.mark.slow
def test_evaluation_captions_join_their_nearest_cluster(
    tiny_text_model: str, tmp_path: Path
) -> None:
    captions = grouped_captions()
    cfg = config(tiny_text_model)
    cache = FeatureCache(tmp_path)
    # Seen sentences join their own cluster whatever the order; repeats agree.
    assign = [SENTENCES[2], SENTENCES[0], SENTENCES[1], SENTENCES[2]]
    result = cluster_captions(captions, cfg, cache, progress=False, assign=assign)
    own = {c: int(result.labels[captions.index(c)]) for c in SENTENCES}
    assert result.assigned is not None
    assert result.assigned.tolist() == [own[c] for c in assign]
    # The fitted labels are those of a run without evaluation captions.
    plain = cluster_captions(captions, cfg, None, progress=False)
    assert np.array_equal(result.labels, plain.labels) and plain.assigned is None


def hand_clustering() -> Clustering:
    """Six clusters of sizes 8, 5, 3, 2, 1, 1 (label 0 largest); 20 captions."""
    sizes = np.array([8, 5, 3, 2, 1, 1], dtype=np.int64)
    return Clustering(labels=np.repeat(np.arange(6), sizes), sizes=sizes)


def test_report_and_plot(tmp_path: Path) -> None:
    report = cluster_size_report(hand_clustering())
    # Sorted ascending 1,1,2,3,5,8: tail ends at the 2nd smallest, middle at the 4th.
    assert report == {
        "num_clusters": 6,
        "num_captions": 20,
        "min_size": 1,
        "median_size": 2.5,
        "max_size": 8,
        "top_decile_share": 8 / 20,  # ceil(6 / 10) = 1 cluster
        "tail_max_size": 1,
        "middle_max_size": 3,
    }
    path = plot_cluster_sizes(hand_clustering().sizes, tmp_path / "plots" / "sizes.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_size_buckets_and_from_labels() -> None:
    clustering = hand_clustering()
    per_sample = clustering.size_of(np.array([0, 1, 2, 3, 4, 5]))
    assert size_buckets(per_sample, clustering).tolist() == [2, 2, 1, 1, 0, 0]
    three = Clustering(labels=np.array([0, 1, 2]), sizes=np.array([10, 5, 2]))
    assert size_buckets(np.array([2, 5, 10, 10]), three).tolist() == [0, 1, 2, 2]
    renumbered = Clustering.from_labels(np.array([7, 3, 3, 9, 3, 7]))
    assert renumbered.labels.tolist() == [1, 0, 0, 2, 0, 1]
    assert renumbered.sizes.tolist() == [3, 2, 1]
    tied = Clustering.from_labels(np.array([5, 2, 2, 5, 8]))  # equal sizes: first appearance
    assert tied.labels.tolist() == [0, 1, 1, 0, 2] and tied.sizes.tolist() == [2, 2, 1]


def test_minibatch_path_finds_blobs() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3] * 10
    points = np.concatenate([c + rng.normal(size=(100, 8)) for c in centres])
    weights = np.ones(len(points))
    labels = clusters.run_kmeans(points, weights, 3, 0, "sklearn-minibatch")
    assert np.array_equal(labels, clusters.run_kmeans(points, weights, 3, 0, "sklearn-minibatch"))
    assert all(len(set(labels[i : i + 100].tolist())) == 1 for i in (0, 100, 200))
    assert len(set(labels.tolist())) == 3


def test_a_missing_text_model_names_the_cluster_setting(tmp_path: Path) -> None:
    """Not the text tower's setting: the clusters load their own model."""
    config = ClusterConfig(num_clusters=2, text_model=str(tmp_path / "no-such-model"))
    with pytest.raises(
        ConfigurationError, match=r"^data\.clusters\.text_model='[^']*no-such-model' looks like"
    ):
        cluster_captions(["a red circle", "a blue square"], config, None, progress=False)


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_clusters", 0), ("num_clusters", True), ("num_clusters", 2.5), ("backend", "annoy")],
)
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=rf"^data\.clusters\.{field}={value!r}; expected"):
        ClusterConfig(**{field: value})


def test_backend_choice(tiny_text_model: str) -> None:
    assert resolve_backend("sklearn", 100_000) == "sklearn-minibatch"
    assert resolve_backend("auto", 100) == "sklearn-kmeans"
    if importlib.util.find_spec("faiss") is None:
        assert resolve_backend("auto", 100_000) == "sklearn-minibatch"
    cfg = ClusterConfig(num_clusters=3, text_model=tiny_text_model, backend="faiss")
    if importlib.util.find_spec("faiss") is None:
        with pytest.raises(ConfigurationError, match="faiss is not installed"):
            cluster_captions(grouped_captions(), cfg, None, progress=False)
    else:
        result = cluster_captions(grouped_captions(), cfg, None, progress=False)
        assert sorted(result.sizes.tolist()) == [2, 5, 10]
