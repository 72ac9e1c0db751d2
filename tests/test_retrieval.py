"""Retrieval ranks and metrics against hand-worked cases and an independent brute force."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from adaptalign.lightning_modules.retrieval import RetrievalMetric, retrieval_ranks

CAPTIONS_PER_IMAGE = 5


# ---------------------------------------------------------------------------------------------
# Independent reference: plain Python loops over float64 dot products.
# ---------------------------------------------------------------------------------------------


def brute_force_ranks(
    images: Tensor, image_ids: Tensor, texts: Tensor, text_image_ids: Tensor
) -> tuple[list[int], list[int]]:
    """Ranks straight from the definitions; refuses data whose comparisons are near-ties."""
    img, txt = images.tolist(), texts.tolist()
    iids, tiids = image_ids.tolist(), text_image_ids.tolist()
    sim = [[sum(a * b for a, b in zip(i, t, strict=True)) for t in txt] for i in img]
    closest = math.inf

    i2t = []
    for r, iid in enumerate(iids):
        best = max(sim[r][c] for c, owner in enumerate(tiids) if owner == iid)
        others = [sim[r][c] for c, owner in enumerate(tiids) if owner != iid]
        closest = min(closest, *(abs(s - best) for s in others))
        i2t.append(sum(1 for s in others if s >= best))

    t2i = []
    for c, owner in enumerate(tiids):
        positive = sim[iids.index(owner)][c]
        others = [sim[r][c] for r, iid in enumerate(iids) if iid != owner]
        closest = min(closest, *(abs(s - positive) for s in others))
        t2i.append(sum(1 for s in others if s >= positive))

    # float32 vs float64 could only disagree on a near-tie; make sure the data has none.
    assert closest > 1e-4
    return i2t, t2i


def brute_force_metrics(i2t: list[int], t2i: list[int], ks: tuple[int, ...]) -> dict[str, float]:
    """R@K, rsum and medr from the textbook definitions, with Python's statistics.median."""
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * sum(1 for r in ranks if r < k) / len(ranks)
    out["rsum"] = sum(out[f"{name}_R@{k}"] for name in ("i2t", "t2i") for k in ks)
    out["i2t_medr"] = math.floor(statistics.median(i2t)) + 1
    out["t2i_medr"] = math.floor(statistics.median(t2i)) + 1
    return out


def random_dataset(num_images: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Images with scattered ids; captions are noisy copies of their image, in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    dim = 8
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=g), dim=1)
    image_ids = 1000 + 7 * torch.randperm(num_images, generator=g)
    owner = torch.arange(num_images).repeat_interleave(CAPTIONS_PER_IMAGE)
    owner = owner[torch.randperm(owner.numel(), generator=g)]
    noise = 0.9 * torch.randn(owner.numel(), dim, generator=g)
    texts = torch.nn.functional.normalize(images[owner] + noise, dim=1)
    text_ids = 50_000 + torch.randperm(owner.numel(), generator=g)
    return images, image_ids, texts, text_ids, image_ids[owner]


RANDOM_CASES = [(7, 0), (6, 1), (8, 2)]


# ---------------------------------------------------------------------------------------------
# Hand-worked cases.
# ---------------------------------------------------------------------------------------------


def hand_case() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """3 images x 2 captions in 2-D, built so every similarity is an exact float.

    Images A=(1,0), B=(0,1), C=(-1,0) have ids 10, 20, 30; a dot product with A is the caption's x,
    with B its y, with C minus its x. Captions (owner): a0=(.8,.6) A, a1=(0,-1) A, b0=(.6,.8) B,
    b1=(-.8,.6) B, c0=(.8,.6) C, c1=(-.6,-.8) C. Similarities (rows A, B, C):

          a0    a1    b0    b1    c0    c1
      A   .8     0    .6   -.8    .8   -.6
      B   .6    -1    .8    .6    .6   -.8
      C  -.8     0   -.6    .8   -.8    .6

    Ties count against the query.
    image->text: A's best own is .8; c0 ties at .8, which counts as above -> rank 1.
    B's best own is .8, nobody else above -> 0. C's best own is .6 (c1); b1 has .8 -> 1.
    text->image: a0 (.8 vs .6, -.8) -> 0; a1 (0 vs -1, 0: a tie) -> 1; b0 (.8 vs .6, -.6) -> 0;
    b1 (.6 vs A -.8, C .8) -> 1; c0 (-.8 vs A .8, B .6) -> 2; c1 (.6 vs -.6, -.8) -> 0.
    """
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    texts = torch.tensor(
        [[0.8, 0.6], [0.0, -1.0], [0.6, 0.8], [-0.8, 0.6], [0.8, 0.6], [-0.6, -0.8]]
    )
    return images, torch.tensor([10, 20, 30]), texts, torch.tensor([10, 10, 20, 20, 30, 30])


HAND_I2T = [1, 0, 1]
HAND_T2I = [0, 1, 0, 1, 2, 0]


def pattern_case() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """4 images, one caption each, with a chosen similarity matrix.

    Images are the standard basis, so similarity(image j, caption t) is entry j of caption t: the
    captions are the columns of S below (not unit vectors; only dot products matter here). The own
    pair scores .5, a "1" in the pattern scores .9 (beats it) and a "0" scores .1:

        pattern  t0 t1 t2 t3      text->image ranks = column sums = [0, 0, 3, 3]
        image 0   -  0  1  1      image->text ranks = row sums    = [2, 2, 1, 1]
        image 1   0  -  1  1
        image 2   0  0  -  1
        image 3   0  0  1  -
    """
    pattern = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 1, 0]])
    sim = torch.where(pattern.bool(), 0.9, 0.1)
    sim.fill_diagonal_(0.5)
    return torch.eye(4), torch.tensor([0, 1, 2, 3]), sim.T.contiguous(), torch.tensor([0, 1, 2, 3])


def metric_on(
    images: Tensor,
    image_ids: Tensor,
    texts: Tensor,
    text_image_ids: Tensor,
    text_ids: Tensor | None = None,
    **kwargs: object,
) -> dict[str, Tensor]:
    """One update with the whole set, then compute."""
    metric = RetrievalMetric(**kwargs)
    if text_ids is None:
        text_ids = torch.arange(texts.shape[0])
    metric.update(images, image_ids, texts, text_ids, text_image_ids)
    return metric.compute()


def test_hand_case_ranks() -> None:
    i2t, t2i = retrieval_ranks(*hand_case())
    assert i2t.tolist() == HAND_I2T
    assert t2i.tolist() == HAND_T2I


def test_hand_case_metrics() -> None:
    out = metric_on(*hand_case(), ks=(1, 2, 3))
    # i2t ranks [1, 0, 1]: R@1 = 1/3, R@2 = R@3 = 3/3.
    # t2i ranks [0, 1, 0, 1, 2, 0]: R@1 = 3/6, R@2 = 5/6, R@3 = 6/6.
    expected = {
        "i2t_R@1": 100 / 3,
        "i2t_R@2": 100.0,
        "i2t_R@3": 100.0,
        "t2i_R@1": 50.0,
        "t2i_R@2": 500 / 6,
        "t2i_R@3": 100.0,
        "rsum": 100 / 3 + 200 + 50 + 500 / 6 + 100,
        # sorted i2t [0, 1, 1] -> median 1; sorted t2i [0, 0, 0, 1, 1, 2] -> (0 + 1) / 2 = 0.5.
        "i2t_medr": 2.0,
        "t2i_medr": 1.0,
    }
    assert list(out) == list(expected)
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, rel=1e-6), key


def test_pattern_case_medr_and_rsum() -> None:
    images, image_ids, texts, text_image_ids = pattern_case()
    i2t, t2i = retrieval_ranks(images, image_ids, texts, text_image_ids)
    assert i2t.tolist() == [2, 2, 1, 1]
    assert t2i.tolist() == [0, 0, 3, 3]

    out = metric_on(images, image_ids, texts, text_image_ids, ks=(1, 2, 3, 4))
    # i2t ranks [2, 2, 1, 1]: R@1 0, R@2 50, R@3 100, R@4 100 -> 250.
    # t2i ranks [0, 0, 3, 3]: R@1 50, R@2 50, R@3 50, R@4 100 -> 250.
    assert [out[f"i2t_R@{k}"].item() for k in (1, 2, 3, 4)] == [0.0, 50.0, 100.0, 100.0]
    assert [out[f"t2i_R@{k}"].item() for k in (1, 2, 3, 4)] == [50.0, 50.0, 50.0, 100.0]
    assert out["rsum"].item() == pytest.approx(500.0)
    # Even counts average the two middles, then floor, then 1-based:
    # i2t sorted [1, 1, 2, 2] -> 1.5 -> 1 -> 2; t2i sorted [0, 0, 3, 3] -> 1.5 -> 1 -> 2
    # (the lower middle would give 1, the upper middle 4, rounding 1.5 to even 3).
    assert out["i2t_medr"].item() == 2.0
    assert out["t2i_medr"].item() == 2.0


def test_default_ks_keys() -> None:
    out = metric_on(*pattern_case())
    assert list(out) == [
        "i2t_R@1",
        "i2t_R@5",
        "i2t_R@10",
        "t2i_R@1",
        "t2i_R@5",
        "t2i_R@10",
        "rsum",
        "i2t_medr",
        "t2i_medr",
    ]
    # i2t R@1 0, t2i R@1 50; every rank is < 5, so the other four are 100.
    assert out["rsum"].item() == pytest.approx(450.0)


# ---------------------------------------------------------------------------------------------
# Against the brute force, and chunking.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_images", "seed"), RANDOM_CASES)
def test_ranks_match_brute_force_for_every_chunk_size(num_images: int, seed: int) -> None:
    images, image_ids, texts, _, text_image_ids = random_dataset(num_images, seed)
    expected_i2t, expected_t2i = brute_force_ranks(images, image_ids, texts, text_image_ids)
    # The data must exercise more than rank 0, or the comparison would prove little.
    assert max(expected_i2t) > 0
    assert max(expected_t2i) > 0
    for chunk_size in (1, 2, 3, num_images - 1, 1024):
        i2t, t2i = retrieval_ranks(images, image_ids, texts, text_image_ids, chunk_size)
        assert i2t.tolist() == expected_i2t, chunk_size
        assert t2i.tolist() == expected_t2i, chunk_size


@pytest.mark.parametrize(("num_images", "seed"), RANDOM_CASES)
def test_metric_matches_brute_force(num_images: int, seed: int) -> None:
    images, image_ids, texts, text_ids, text_image_ids = random_dataset(num_images, seed)
    ks = (1, 2, 5, 10)
    expected = brute_force_metrics(*brute_force_ranks(images, image_ids, texts, text_image_ids), ks)
    for chunk_size in (1, 3, 1024):
        out = metric_on(
            images, image_ids, texts, text_image_ids, text_ids, ks=ks, chunk_size=chunk_size
        )
        assert list(out) == list(expected)
        for key, value in expected.items():
            assert out[key].item() == pytest.approx(value, rel=1e-6), (chunk_size, key)


class _MatmulRecorder(TorchFunctionMode):
    """Records the output shape of every matrix product issued inside the block."""

    PRODUCTS = {
        torch.matmul,
        torch.mm,
        torch.einsum,
        torch.Tensor.__matmul__,
        torch.Tensor.matmul,
        torch.Tensor.mm,
    }

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if func in self.PRODUCTS:
            self.shapes.append(tuple(result.shape))
        return result


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 100])
def test_one_chunked_matmul_pass_per_direction(chunk_size: int) -> None:
    images, image_ids, texts, _, text_image_ids = random_dataset(7, 0)
    with _MatmulRecorder() as recorder:
        retrieval_ranks(images, image_ids, texts, text_image_ids, chunk_size)
    num_images, num_texts = images.shape[0], texts.shape[0]
    # Image chunks against every caption, then caption chunks against every image; each pair is
    # scored once per direction and no product is larger than chunk_size x num_texts.
    by_image = [rows for rows, cols in recorder.shapes if cols == num_texts]
    by_text = [rows for rows, cols in recorder.shapes if cols == num_images]
    assert len(by_image) + len(by_text) == len(recorder.shapes)
    assert sum(by_image) == num_images and max(by_image) <= chunk_size
    assert sum(by_text) == num_texts
    assert all(rows * cols <= chunk_size * num_texts for rows, cols in recorder.shapes)


# ---------------------------------------------------------------------------------------------
# Duplicates from distributed padding.
# ---------------------------------------------------------------------------------------------


def _padded_order(n: int, world: int) -> list[int]:
    """Indices in the order all_gather returns them after DistributedSampler-style padding."""
    indices = list(range(n))
    indices += indices[: (-n) % world]
    return [i for rank in range(world) for i in indices[rank::world]]


def test_padding_duplicates_do_not_change_the_result() -> None:
    images, image_ids, texts, text_ids, text_image_ids = random_dataset(7, 3)
    reference = metric_on(images, image_ids, texts, text_image_ids, text_ids)

    # Four ranks pad 7 images to 8 and 35 captions to 36, and a few more repeats on top; the
    # batches then arrive shuffled, split unevenly over several update calls.
    rng = random.Random(0)
    image_rows = [*_padded_order(7, 4), 2, 5, 5]
    text_rows = [*_padded_order(35, 4), 0, 17, 17, 34]
    assert len(image_rows) > 7 and len(text_rows) > 35
    rng.shuffle(image_rows)
    rng.shuffle(text_rows)
    metric = RetrievalMetric()
    image_cuts, text_cuts = [0, 3, 4, 9, len(image_rows)], [0, 10, 11, 30, len(text_rows)]
    for b in range(4):
        irows = torch.tensor(image_rows[image_cuts[b] : image_cuts[b + 1]])
        trows = torch.tensor(text_rows[text_cuts[b] : text_cuts[b + 1]])
        metric.update(
            images[irows], image_ids[irows], texts[trows], text_ids[trows], text_image_ids[trows]
        )
    padded = metric.compute()

    assert list(padded) == list(reference)
    for key in reference:
        assert torch.equal(padded[key], reference[key]), key


def test_duplicated_caption_with_conflicting_image_is_refused() -> None:
    images, image_ids, texts, text_image_ids = hand_case()
    metric = RetrievalMetric()
    metric.update(images, image_ids, texts, torch.arange(6), text_image_ids)
    metric.update(images[:1], image_ids[:1], texts[5:], torch.tensor([5]), torch.tensor([10]))
    with pytest.raises(ValueError, match="text id 5 arrived with different text image ids"):
        metric.compute()


# ---------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------


def test_unknown_text_image_id() -> None:
    images, image_ids, texts, _ = hand_case()
    bad = torch.tensor([10, 10, 20, 99, 30, 30])
    with pytest.raises(ValueError, match="text image id 99 is not among the image ids"):
        retrieval_ranks(images, image_ids, texts, bad)


def test_image_without_caption() -> None:
    images, image_ids, texts, _ = hand_case()
    with pytest.raises(ValueError, match="image id 30 has no caption"):
        retrieval_ranks(images, image_ids, texts, torch.tensor([10, 10, 20, 20, 20, 10]))


def test_repeated_image_id() -> None:
    images, _, texts, text_image_ids = hand_case()
    with pytest.raises(ValueError, match="image id 10 appears more than once"):
        retrieval_ranks(images, torch.tensor([10, 20, 10]), texts, text_image_ids)


def test_mismatched_lengths() -> None:
    images, image_ids, texts, text_image_ids = hand_case()
    with pytest.raises(ValueError, match="image_embeddings has 2 rows but image_ids has 3"):
        retrieval_ranks(images[:2], image_ids, texts, text_image_ids)
    with pytest.raises(ValueError, match="text_embeddings has 6 rows but text_image_ids has 5"):
        retrieval_ranks(images, image_ids, texts, text_image_ids[:5])


def test_mismatched_dims() -> None:
    images, image_ids, texts, text_image_ids = hand_case()
    padded = torch.cat([texts, torch.zeros(6, 1)], dim=1)
    with pytest.raises(
        ValueError, match="text_embeddings have dim 3 but image_embeddings have dim 2"
    ):
        retrieval_ranks(images, image_ids, padded, text_image_ids)


def test_empty_inputs() -> None:
    images, image_ids, texts, text_image_ids = hand_case()
    with pytest.raises(ValueError, match="image_embeddings is empty"):
        retrieval_ranks(images[:0], image_ids[:0], texts, text_image_ids)
    with pytest.raises(ValueError, match="text_embeddings is empty"):
        retrieval_ranks(images, image_ids, texts[:0], text_image_ids[:0])


def test_malformed_inputs() -> None:
    images, image_ids, texts, text_image_ids = hand_case()
    with pytest.raises(ValueError, match="image_embeddings must be 2-D"):
        retrieval_ranks(images[0], image_ids[:1], texts, text_image_ids)
    with pytest.raises(ValueError, match="image_ids must hold integers"):
        retrieval_ranks(images, image_ids.float(), texts, text_image_ids)
    nan_texts = texts.clone()
    nan_texts[2, 1] = float("nan")
    with pytest.raises(ValueError, match="text_embeddings contains non-finite values"):
        retrieval_ranks(images, image_ids, nan_texts, text_image_ids)
    for chunk_size in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            retrieval_ranks(images, image_ids, texts, text_image_ids, chunk_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("ks", [(0,), (1, -5), (1, 2.5), (True,), ()])
def test_invalid_ks(ks: tuple) -> None:
    with pytest.raises(ValueError, match="ks"):
        RetrievalMetric(ks=ks)


def test_metric_errors() -> None:
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        RetrievalMetric(chunk_size=0)
    images, image_ids, texts, text_image_ids = hand_case()
    metric = RetrievalMetric()
    with pytest.raises(ValueError, match="image_ids has 3 entries but image_embeddings has 2 rows"):
        metric.update(images[:2], image_ids, texts, torch.arange(6), text_image_ids)
    with pytest.raises(ValueError, match="text_ids has 5 entries but text_embeddings has 6 rows"):
        metric.update(images, image_ids, texts, torch.arange(5), text_image_ids)
    with pytest.raises(ValueError, match="called with no data"):
        metric.compute()


def test_collapsed_embeddings_rank_last_not_first() -> None:
    """Every score ties: ties count against the query, so a collapsed model finds nothing."""
    images = torch.ones(4, 2) / 2**0.5
    texts = torch.ones(8, 2) / 2**0.5
    i2t, t2i = retrieval_ranks(images, torch.arange(4), texts, torch.arange(4).repeat(2))
    assert i2t.tolist() == [6, 6, 6, 6]  # the 6 captions of the other images all tie
    assert t2i.tolist() == [3] * 8  # the 3 other images all tie


def test_collapsed_model_with_a_random_embedding_scores_zero() -> None:
    """All 40 images and 200 captions equal one random 256-d unit vector: every score ties.

    Unlike ones / sqrt(2), a random vector's dot product is rounded; the positive must be rounded
    exactly as the competitors are, or a tie turns into a win. Ten vectors, two chunkings.
    """
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        vector = torch.nn.functional.normalize(torch.randn(256, generator=g), dim=0)
        images, texts = vector.expand(40, 256), vector.expand(200, 256)
        image_ids = torch.arange(40)
        for chunk_size in (7, 1024):
            out = metric_on(
                images, image_ids, texts, image_ids.repeat_interleave(5), chunk_size=chunk_size
            )
            assert out["rsum"].item() == 0.0, (seed, chunk_size)
            assert (out["i2t_medr"].item(), out["t2i_medr"].item()) == (196.0, 40.0)


def test_an_exact_duplicate_of_the_right_image_ties_against_the_caption() -> None:
    """Every image twice (rows k and k + 30), captions noisy copies: each twin ties exactly.

    With twins every other image also comes twice, so a caption's rank is twice its rank among
    the 30 distinct images plus one for its own image's twin, in every chunking.
    """
    dim, distinct = 256, 30
    for seed in (0, 2):  # seeds whose data has no near-tie (checked below)
        g = torch.Generator().manual_seed(seed)
        base = torch.nn.functional.normalize(torch.randn(distinct, dim, generator=g), dim=1)
        images = torch.cat([base, base])
        owner = torch.arange(2 * distinct).repeat_interleave(3)
        noise = 0.35 * torch.randn(owner.numel(), dim, generator=g)
        texts = torch.nn.functional.normalize(images[owner] + noise, dim=1)

        # Ranks among the distinct images, in float64 with no near-ties.
        sim = texts.double() @ base.double().T
        positive = sim.gather(1, (owner % distinct)[:, None])
        gaps = (sim - positive).abs()
        gaps.scatter_(1, (owner % distinct)[:, None], math.inf)
        assert float(gaps.min()) > 1e-4
        distinct_ranks = (sim >= positive).sum(dim=1) - 1
        assert int(distinct_ranks.max()) > 0  # not all trivially first

        for chunk_size in (7, 1024):
            _, t2i = retrieval_ranks(images, torch.arange(2 * distinct), texts, owner, chunk_size)
            assert t2i.tolist() == (2 * distinct_ranks + 1).tolist(), (seed, chunk_size)


# ---------------------------------------------------------------------------------------------
# Per-group recall (head / middle / tail queries).
# ---------------------------------------------------------------------------------------------


def test_hand_case_per_group_recall() -> None:
    images, image_ids, texts, text_image_ids = hand_case()
    # i2t ranks [1, 0, 1], t2i ranks [0, 1, 0, 1, 2, 0] (see test_hand_case_metrics).
    image_groups = torch.tensor([0, 2, 2])
    text_groups = torch.tensor([0, 0, 1, 1, 2, 2])
    metric = RetrievalMetric(ks=(1, 2))
    metric.update(
        images, image_ids, texts, torch.arange(6), text_image_ids, image_groups, text_groups
    )
    out = metric.compute()
    # tail: image 0 (rank 1) and captions 0, 1 (ranks 0, 1).
    assert out["tail/i2t_R@1"].item() == 0.0
    assert out["tail/i2t_R@2"].item() == 100.0
    assert out["tail/t2i_R@1"].item() == 50.0
    assert out["tail/t2i_R@2"].item() == 100.0
    assert out["tail/rsum"].item() == pytest.approx(250.0)
    # middle: no image query, so only text->image keys and no rsum; captions 2, 3 (ranks 0, 1).
    assert "middle/i2t_R@1" not in out and "middle/rsum" not in out
    assert out["middle/t2i_R@1"].item() == 50.0
    # head: images 1, 2 (ranks 0, 1); captions 4, 5 (ranks 2, 0).
    assert out["head/i2t_R@1"].item() == 50.0
    assert out["head/i2t_R@2"].item() == 100.0
    assert out["head/t2i_R@1"].item() == 50.0
    assert out["head/t2i_R@2"].item() == 50.0
    # The overall figures do not change when groups are given.
    plain = metric_on(images, image_ids, texts, text_image_ids, ks=(1, 2))
    for key, value in plain.items():
        assert torch.equal(out[key], value), key


def test_per_group_recall_matches_brute_force_with_padding() -> None:
    images, image_ids, texts, text_ids, text_image_ids = random_dataset(9, 4)
    i2t, t2i = brute_force_ranks(images, image_ids, texts, text_image_ids)
    image_groups = torch.tensor([i % 3 for i in range(9)])
    text_groups = torch.tensor([(i * 7) % 3 for i in range(texts.shape[0])])
    metric = RetrievalMetric()
    # Duplicated rows (as distributed padding adds) must not change anything.
    irows = torch.tensor([*range(9), 3, 4])
    trows = torch.tensor([*range(texts.shape[0]), 0, 10])
    metric.update(
        images[irows],
        image_ids[irows],
        texts[trows],
        text_ids[trows],
        text_image_ids[trows],
        image_groups[irows],
        text_groups[trows],
    )
    out = metric.compute()
    for index, name in enumerate(("tail", "middle", "head")):
        mine_i2t = [r for r, g in zip(i2t, image_groups.tolist(), strict=True) if g == index]
        mine_t2i = [r for r, g in zip(t2i, text_groups.tolist(), strict=True) if g == index]
        expected = brute_force_metrics(mine_i2t, mine_t2i, (1, 5, 10))
        for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"):
            assert out[f"{name}/{key}"].item() == pytest.approx(expected[key]), (name, key)


def test_group_errors() -> None:
    images, image_ids, texts, text_image_ids = hand_case()
    metric = RetrievalMetric()
    with pytest.raises(ValueError, match="given together"):
        metric.update(images, image_ids, texts, torch.arange(6), text_image_ids, torch.zeros(3))
    with pytest.raises(ValueError, match=r"text_groups must hold one value in \[0, 3\)"):
        metric.update(
            images,
            image_ids,
            texts,
            torch.arange(6),
            text_image_ids,
            torch.zeros(3, dtype=torch.long),
            torch.full((6,), 3),
        )
    metric.update(images, image_ids, texts, torch.arange(6), text_image_ids)
    metric.update(
        images,
        image_ids,
        texts,
        torch.arange(6),
        text_image_ids,
        torch.zeros(3, dtype=torch.long),
        torch.zeros(6, dtype=torch.long),
    )
    with pytest.raises(ValueError, match="every update needs image_groups"):
        metric.compute()
