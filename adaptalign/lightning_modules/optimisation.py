"""The system's optimiser: parameter groups with their learning rates, and warm-up then cosine."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def tower_sets(
    depths: Sequence[tuple[nn.Parameter, int]], tower_lr: float, decay: float
) -> list[tuple[str, list[nn.Parameter], float]]:
    """Trained backbone parameters by learning rate: all at ``tower_lr`` when ``decay`` is 1,
    else one set per depth below the tower's top at ``tower_lr * decay ** depth``."""
    if decay == 1:
        return [("towers", [p for p, _ in depths], tower_lr)]
    by_depth: dict[int, list[nn.Parameter]] = {}
    for param, depth in depths:
        by_depth.setdefault(depth, []).append(param)
    return [(f"towers_depth{d}", by_depth[d], tower_lr * decay**d) for d in sorted(by_depth)]


def parameter_groups(
    sets: Sequence[tuple[str, Sequence[nn.Parameter], float]], weight_decay: float
) -> list[dict]:
    """One optimiser group per (name, parameters, learning rate); weight decay on matrices only.

    Vectors and scalars (biases, norms, the temperature) go to ``<name>_no_decay`` groups.
    """
    groups = []
    for name, params, group_lr in sets:
        matrices = [p for p in params if p.ndim >= 2]
        others = [p for p in params if p.ndim < 2]
        if matrices:
            groups.append(
                {"name": name, "params": matrices, "lr": group_lr, "weight_decay": weight_decay}
            )
        if others:
            groups.append(
                {"name": f"{name}_no_decay", "params": others, "lr": group_lr, "weight_decay": 0.0}
            )
    return groups


def optimiser_with_schedule(
    groups: list[dict],
    optimizer: str,
    momentum: float,
    total_steps: int,
    warmup: float,
    min_lr_ratio: float,
    betas: tuple[float, float],
) -> dict:
    """AdamW (with ``betas``) or SGD over ``groups``, stepped per batch by :func:`warmup_cosine`.

    ``warmup`` is a fraction of ``total_steps`` when below 1, else a step count.
    """
    if optimizer == "sgd":
        built: torch.optim.Optimizer = torch.optim.SGD(groups, momentum=momentum)
    else:
        built = torch.optim.AdamW(groups, betas=betas)
    warmup_steps = int(warmup * total_steps) if warmup < 1 else int(warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        built, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio)
    )
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
