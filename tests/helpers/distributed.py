"""Run a function on several CPU processes joined by a gloo process group, as DDP would."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, fn: Callable, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, tmp_path: Path, *args: object) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` processes; raises if any process fails."""
    init_file = tmp_path / "dist_init"
    mp.spawn(_entry, args=(world, str(init_file), fn, args), nprocs=world, join=True)
