"""The global random generators' states, as a checkpoint keeps them.

A resumed run restores weights, optimiser and loop counters, but the global generators restart
from the seed, so dropout (in a fine-tuned text tower, say) would draw other masks than the run it
continues and the two runs would part. Checkpoints therefore carry every process's generator
states (torch, CUDA, numpy, Python), stored as tensors and plain numbers so that a checkpoint still
loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def capture() -> dict[str, Any]:
    """This process's generator states."""
    key, pos, has_gauss, gauss = np.random.get_state()[1:]
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore(states: dict[str, Any]) -> None:
    """Set this process's generators to ``states`` (from :func:`capture`)."""
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    key = numpy["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    python = states["python"]
    internal = tuple(int(v) for v in python["internal"].tolist())
    random.setstate((python["version"], internal, python["gauss_next"]))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def gather(world_size: int) -> list[dict[str, Any]]:
    """Every process's states, in rank order; under DDP all processes must call it together."""
    states = capture()
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [states]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, states)
    return gathered


def for_rank(saved: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any] | None:
    """The states a process resumes with: its own; none when the number of processes changed."""
    if len(saved) != world_size or not 0 <= rank < len(saved):
        return None
    return saved[rank]
