"""The names of the retrieval metrics, spelled here only.

What :class:`~adaptalign.lightning_modules.retrieval.RetrievalMetric` computes, the callbacks log
and summarise, and the comparisons tabulate and plot, all under these names.
"""

from __future__ import annotations

DIRECTIONS = ("i2t", "t2i")  # image->text, text->image
KS = (1, 5, 10)
GROUPS = ("tail", "middle", "head")  # queries by the size of their caption's cluster
RSUM = "rsum"  # the sum of every R@K of both directions


def recall_name(direction: str, k: int) -> str:
    """``i2t_R@5``: the percentage of ``direction``'s queries found among the top ``k``."""
    return f"{direction}_R@{k}"


def recall_k(name: str, direction: str) -> int | None:
    """The K of a recall of ``direction`` (``i2t_R@5`` -> 5); ``None`` for any other name."""
    head, found, k = name.partition("_R@")
    return int(k) if found and head == direction and k.isdigit() else None


def median_rank_name(direction: str) -> str:
    """``i2t_medr``: the 1-based median rank of ``direction``'s queries."""
    return f"{direction}_medr"


def group_name(group: str, metric: str) -> str:
    """``tail/t2i_R@1``: a metric over one group's queries."""
    return f"{group}/{metric}"


RECALLS = tuple(recall_name(d, k) for d in DIRECTIONS for k in KS)
MEDIAN_RANKS = tuple(median_rank_name(d) for d in DIRECTIONS)
METRICS = (*RECALLS, RSUM, *MEDIAN_RANKS)  # what RetrievalMetric computes with its defaults
