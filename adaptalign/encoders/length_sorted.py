"""Encoding captions in batches sorted by length, so little or nothing is padded.

The text tower sorts by character length for speed; the frozen-feature cache groups captions of
exactly one token length, so its features never depend on padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def encode_by_length(
    texts: Sequence[str],
    size: int,
    encode: Callable[[list[str]], Tensor],
) -> Tensor:
    """``encode`` over chunks of ``size`` captions sorted by length; rows come back in input order.

    Each chunk pads only to its own longest caption. Character length stands in for token length,
    which keeps tokenisation (and its padding side) to the model.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(0)
    for start in range(0, len(order), size):
        index = order[start : start + size]
        rows = encode([texts[i] for i in index])
        if out.numel() == 0:
            out = rows.new_empty((len(texts), *rows.shape[1:]))
        out[torch.tensor(index, device=rows.device)] = rows
    return out


def token_lengths(backbone: nn.Module, captions: Sequence[str]) -> list[int]:
    """Each caption's token count as the backbone tokenises it (truncated to its budget)."""
    tokenize = getattr(backbone, "preprocess", None) or backbone.tokenize
    return tokenize(list(captions))["attention_mask"].sum(dim=1).tolist()


def length_batches(captions: Sequence[str], lengths: Sequence[int], size: int) -> list[list[int]]:
    """Positions in batches of at most ``size`` captions of one token length (then by text)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(captions)), key=lambda i: (lengths[i], captions[i])):
        last = batches[-1] if batches else None
        if last is not None and len(last) < size and lengths[last[0]] == lengths[i]:
            last.append(i)
        else:
            batches.append([i])
    return batches
