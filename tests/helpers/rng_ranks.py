"""Runs on each process of the distributed generator-state test; kept light, as every spawned
process imports the module its function lives in."""

from __future__ import annotations

import torch

from adaptalign.lightning_modules import rng


def gather_work(rank: int, world: int, out: str) -> None:
    """Seed each process differently, gather, and record which gathered states are whose."""
    torch.manual_seed(100 + rank)
    gathered = rng.gather(world)
    own = [torch.equal(states["torch"], gathered[rank]["torch"]) for states in gathered]
    picked = rng.for_rank(gathered, rank, world) is gathered[rank]
    torch.save({"own": own, "picked": picked}, f"{out}{rank}")
