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


def parameter_groups(
    towers: Sequence[nn.Parameter],
    heads: Sequence[nn.Parameter],
    tower_lr: float,
    lr: float,
    weight_decay: float,
) -> list[dict]:
    """Backbones at ``tower_lr`` and heads at ``lr``; weight decay on matrices only.

    Vectors and scalars (biases, norms, the temperature) go to ``<name>_no_decay`` groups.
    """
    groups = []
    for name, params, group_lr in (("towers", towers, tower_lr), ("projections", heads, lr)):
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
) -> dict:
    """AdamW or SGD over ``groups``, stepped per batch by :func:`warmup_cosine`.

    ``warmup`` is a fraction of ``total_steps`` when below 1, else a step count.
    """
    if optimizer == "sgd":
        built: torch.optim.Optimizer = torch.optim.SGD(groups, momentum=momentum)
    else:
        built = torch.optim.AdamW(groups)
    warmup_steps = int(warmup * total_steps) if warmup < 1 else int(warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        built, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio)
    )
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
