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
    lengths = [len(t) for t in texts]
    return _by_length(lengths, size, lambda index: encode([texts[i] for i in index]))


def padded_by_length(
    hidden: Tensor,
    mask: Tensor,
    size: int,
    encode: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """``encode`` over chunks of ``size`` padded token rows ``(B, T, H)`` sorted by their length
    (``mask`` ``(B, T)``), each chunk cut to its own longest row; rows come back in input order.

    Cached hidden states of a batch are padded to its longest caption, about twice the typical
    Flickr caption; a chunk of similar lengths does about half the work.
    """
    lengths = mask.sum(dim=1)

    def chunk(index: list[int]) -> Tensor:
        rows = torch.tensor(index, device=hidden.device)
        longest = int(lengths[rows].max())
        return encode(hidden[rows, :longest], mask[rows, :longest])

    return _by_length(lengths.tolist(), size, chunk)


def _by_length(lengths: Sequence[int], size: int, encode: Callable[[list[int]], Tensor]) -> Tensor:
    """``encode(positions)`` over chunks of ``size`` positions sorted by length, in input order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out = torch.empty(0)
    for start in range(0, len(order), size):
        index = order[start : start + size]
        rows = encode(index)
        if out.numel() == 0:
            out = rows.new_empty((len(lengths), *rows.shape[1:]))
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
