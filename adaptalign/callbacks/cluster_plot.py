"""Writes the rank-size plot of the training captions' clusters into the run's log folder.

How long the tail is decides whether a long-tail schedule has anything to act on, so a run with
caption clusters leaves ``cluster_sizes.png`` beside its logs. The data module computes the sizes
and draws nothing; this callback writes the plot, from process 0 only.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from adaptalign.datamodules.clusters import plot_cluster_sizes

FILE = "cluster_sizes.png"


class ClusterSizePlot(L.Callback):
    """``cluster_sizes.png`` in the logger's folder once the data module has caption clusters.

    Written at ``setup`` once per log folder; nothing without a logger or without clusters.
    """

    def __init__(self) -> None:
        self.written: set[Path] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        sizes = getattr(trainer.datamodule, "cluster_sizes", None)
        # ``trainer.log_dir`` is a collective under DDP; process 0 asks its logger instead.
        if sizes is None or not trainer.is_global_zero or trainer.logger is None:
            return
        log_dir = trainer.logger.log_dir
        if log_dir is None:
            return
        path = Path(log_dir) / FILE
        if path in self.written:
            return
        plot_cluster_sizes(sizes, path)
        self.written.add(path)
        rank_zero_info(f"cluster-size plot: {path}")
