"""Checkpoints without the weights of frozen backbones loaded from a named source.

A frozen backbone loaded from a file or a pretrained model never changes while it trains, and
building the model for any checkpoint (to resume it, validate, test, predict or stress it) loads
that source again anyway. Writing its weights into every checkpoint is then the largest cost of a
short run: in the Flickr8k frozen setting they are 108 MB of a 110 MB checkpoint, written after
every validation and again for each new best, several seconds per run on a small machine. So a
checkpoint records each such backbone's source and a digest of its exact weights instead; loading
the checkpoint puts the freshly loaded weights back in their place after checking the digest, and
refuses a source whose weights are no longer those the checkpoint was trained with.

Backbones that train, and frozen ones drawn at random (no source to load them from again), stay
in the checkpoint as before. Checkpoints written with all weights load as before.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from adaptalign.common.errors import ConfigurationError

KEY = "frozen_backbones"

# A frozen backbone's weights stay as loaded while its module lives, so each is digested once.
_digests: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


class SourcedTower(Protocol):
    """What a tower tells about its backbone: whether it trains, and where its weights come from."""

    backbone: nn.Module
    frozen: bool

    @property
    def weights_source(self) -> str | None: ...


def weights_digest(module: nn.Module) -> str:
    """Digest of a module's parameters and buffers: names, types, shapes and exact values."""
    known = _digests.get(module)
    if known is not None:
        return known
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(data.numpy().data)
    _digests[module] = digest.hexdigest()
    return _digests[module]


def left_out(towers: Mapping[str, SourcedTower]) -> dict[str, SourcedTower]:
    """The towers whose backbones a checkpoint leaves out: frozen, loaded from a source."""
    return {
        name: tower
        for name, tower in towers.items()
        if tower.frozen and tower.weights_source is not None
    }


def leave_out(towers: Mapping[str, SourcedTower], checkpoint: dict[str, Any]) -> None:
    """Takes the backbones of :func:`left_out` out of the checkpoint's state dict, recording
    their source and digest under ``frozen_backbones``."""
    state = checkpoint.get("state_dict")
    if state is None:
        return
    record = {}
    for name, tower in left_out(towers).items():
        prefix = f"{name}.backbone."
        keys = [key for key in state if key.startswith(prefix)]
        if not keys:
            continue
        for key in keys:
            del state[key]
        record[name] = {"source": tower.weights_source, "digest": weights_digest(tower.backbone)}
    if record:
        checkpoint[KEY] = record


def put_back(towers: Mapping[str, SourcedTower], checkpoint: dict[str, Any]) -> None:
    """Puts the loaded backbones' weights into a checkpoint that left them out, once their digest
    shows they are the weights it was trained with."""
    state = checkpoint.get("state_dict")
    record = checkpoint.get(KEY) or {}
    if state is None:
        return
    for name, saved in record.items():
        prefix = f"{name}.backbone."
        if any(key.startswith(prefix) for key in state):
            continue
        tower = towers.get(name)
        source = saved.get("source", "its source")
        if tower is None or weights_digest(tower.backbone) != saved.get("digest"):
            setting = "no such tower" if tower is None else tower.weights_source or "random"
            raise ConfigurationError(
                f"the checkpoint was trained with the frozen {name.replace('_', ' ')} loaded from "
                f"{source}, and holds only a digest of its weights; the model built now "
                f"({setting}) has other weights. Give the weights it was trained with."
            )
        state.update({prefix + key: value for key, value in tower.backbone.state_dict().items()})
