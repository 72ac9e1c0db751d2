"""Caption clusters with faiss: reproducible labels, numbering by size, the backend "auto" picks,
and the k-means scale benchmark's verdicts."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules import clusters
from adaptalign.datamodules.clusters import (
    FAISS_ABOVE,
    MINIBATCH_ABOVE,
    ClusterConfig,
    cluster_captions,
    resolve_backend,
)

faiss = pytest.importorskip("faiss")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
GROUPS, PER_GROUP, DIM = 5, 200, 16


def blobs() -> tuple[list[str], np.ndarray]:
    """GROUPS well-separated groups of PER_GROUP distinct captions, in sorted caption order (the
    order k-means sees), as unit vectors near GROUPS orthogonal directions."""
    rng = np.random.default_rng(0)
    names = sorted(f"group {g} caption {i:03d}" for g in range(GROUPS) for i in range(PER_GROUP))
    group = np.array([int(name.split()[1]) for name in names])
    points = np.eye(DIM)[group] + 0.05 * rng.standard_normal((group.size, DIM))
    return names, points / np.linalg.norm(points, axis=1, keepdims=True)


def test_faiss_gives_the_same_labels_twice_and_finds_the_groups() -> None:
    names, points = blobs()
    weights = np.ones(len(names))
    first = clusters.run_kmeans(points, weights, GROUPS, 0, "faiss")
    assert np.array_equal(first, clusters.run_kmeans(points, weights, GROUPS, 0, "faiss"))
    group = np.repeat(np.arange(GROUPS), PER_GROUP)
    assert all(np.unique(first[group == g]).size == 1 for g in range(GROUPS))
    assert np.unique(first).size == GROUPS


def test_faiss_gives_rare_groups_their_own_cluster() -> None:
    """Four groups of 5 captions beside one of 2,000, k = 5: faiss's default random start puts
    its centres in the big group (9 seeds of 10) and never separates the small ones; the
    k-means++ start picks far points first and finds all five groups."""
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(5), [2000, 5, 5, 5, 5])
    points = np.eye(DIM)[group] + 0.001 * rng.standard_normal((group.size, DIM))
    labels = clusters.run_kmeans(points, np.ones(group.size), 5, 0, "faiss")
    assert [np.unique(labels[group == g]).size for g in range(5)] == [1] * 5
    assert np.unique(labels).size == 5


def test_faiss_runs_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads can put a point at a near tie into another cluster (seen on a million points)."""
    seen = []
    real = clusters._faiss_kmeans

    def counted(*args: object, **kwargs: object) -> np.ndarray:
        seen.append(faiss.omp_get_max_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(clusters, "_faiss_kmeans", counted)
    _, points = blobs()
    clusters.run_kmeans(points, np.ones(len(points)), GROUPS, 0, "faiss")
    assert seen == [1]


def test_faiss_clusters_are_numbered_by_size(
    tiny_text_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group g's captions occur g + 1 times each, so the last group is the largest (label 0)."""
    names, points = blobs()
    rows = dict(zip(names, torch.from_numpy(points).float(), strict=True))

    def embed(model: object, captions: list[str], cache: object, progress: bool) -> torch.Tensor:
        return torch.stack([rows[c] for c in captions])

    monkeypatch.setattr(clusters, "embed_captions", embed)
    captions = [name for name in names for _ in range(int(name.split()[1]) + 1)]
    config = ClusterConfig(num_clusters=GROUPS, text_model=tiny_text_model, backend="faiss")
    result = cluster_captions(captions[::-1], config, None, progress=False)
    assert result.sizes.tolist() == [PER_GROUP * (GROUPS - g) for g in range(GROUPS)]
    expected = [GROUPS - 1 - int(caption.split()[1]) for caption in captions[::-1]]
    assert result.labels.tolist() == expected


def test_auto_picks_faiss_above_its_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend("auto", FAISS_ABOVE + 1) == "faiss"
    assert resolve_backend("auto", FAISS_ABOVE) == "sklearn-minibatch"
    assert resolve_backend("auto", MINIBATCH_ABOVE) == "sklearn-kmeans"
    assert resolve_backend("faiss", 10) == "faiss"
    assert resolve_backend("sklearn", FAISS_ABOVE + 1) == "sklearn-minibatch"


def test_faiss_on_a_gpu_is_its_own_algorithm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its arithmetic differs from the CPU's, so its labels must not share their cache entry."""
    monkeypatch.setattr(clusters, "faiss_gpus", lambda: 1)
    assert resolve_backend("auto", FAISS_ABOVE + 1) == "faiss-gpu"
    assert resolve_backend("faiss", 10) == "faiss-gpu"
    assert resolve_backend("sklearn", FAISS_ABOVE + 1) == "sklearn-minibatch"


def test_a_faiss_without_kmeans_plus_plus_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clusters, "_faiss_has_kmeans_plus_plus", lambda: False)
    assert resolve_backend("auto", FAISS_ABOVE + 1) == "sklearn-minibatch"
    with pytest.raises(ConfigurationError, match=r"but faiss is older; install .* >= 1\.14"):
        resolve_backend("faiss", 10)


# ------------------------------------------------------------------------- the benchmark


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/bench_kmeans_scale.py as a module, as running it from its folder imports it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("bench_kmeans_scale")


def test_benchmark_data_and_inertia(bench: ModuleType) -> None:
    x = bench.synthetic_embeddings(3000, 10, seed=1)
    assert x.shape == (3000, bench.DIM) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(x, bench.synthetic_embeddings(3000, 10, seed=1))
    # by hand: cluster {a, b} around their mean, c alone; weights count twice
    points = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 0, 1])
    assert bench.inertia(points, labels, np.ones(3)) == pytest.approx(1.0)
    # weights 2 and 1: the mean sits at (2/3, 1/3), distances 2/9 and 8/9
    assert bench.inertia(points, labels, np.array([2.0, 1.0, 5.0])) == pytest.approx(4 / 3)


@pytest.mark.parametrize(
    ("seconds", "ratio", "missed"),
    [
        (120.0, 0.99, None),
        (120.0, 1.019, None),
        (601.0, 0.99, "faiss <= 600 s"),
        (120.0, 1.03, "faiss inertia <= 1.02x sklearn's"),
    ],
)
def test_benchmark_verdicts(
    bench: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    seconds: float,
    ratio: float,
    missed: str | None,
) -> None:
    """Each side's measurement is replaced by fixed numbers; main prints and judges them."""
    monkeypatch.setattr(bench, "synthetic_embeddings", lambda points, k, seed: np.zeros((4, 2)))
    inertias = {"sklearn mini-batch": 1100.0, "faiss": 1000.0 * ratio}

    def measure(name: str, fit, x, weights, k) -> object:
        wall = seconds if name == "faiss" else 300.0
        return bench.Side(name, wall, wall, inertias.get(name, 1000.0), k)

    monkeypatch.setattr(bench, "measure", measure)
    status = bench.main(["--threads", str(torch.get_num_threads())])
    printed = capsys.readouterr().out
    assert status == (1 if missed else 0)
    assert f"faiss / sklearn mini-batch: time {seconds / 300:.2f}x" in printed
    best = "sklearn-minibatch + 20 full passes (project)"
    assert f"faiss inertia / best sklearn ({best}) {ratio:.4f}x (goal <= 1.02)" in printed
    assert ("Overall: PASS" in printed) == (missed is None)
    if missed:
        assert f"Overall: FAIL (missed: {missed})" in printed


def test_benchmark_runs_small(bench: ModuleType, capsys: pytest.CaptureFixture) -> None:
    """The real thing at a tiny size, faiss alone: no sklearn side, so only the time is judged."""
    # The process's own thread count: a benchmark's setting would outlive the test.
    threads = str(torch.get_num_threads())
    argv = ["--points", "2000", "--clusters", "5", "--sklearn", "none", "--threads", threads]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2000 synthetic caption embeddings" in printed and "5/5" in printed
