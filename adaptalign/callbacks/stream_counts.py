"""How many pairs a streamed epoch trained on, and how many bad samples it skipped.

A map-style loader's epoch is its data set; a stream of WebDataset shards is only what its
workers read. Each streamed batch carries two counters (``stream_bad``: broken samples its worker
skipped since its previous batch; ``stream_repeated``: items in it repeated to keep the processes'
batch counts equal), and this callback sums them with the batch sizes over the epoch and over
every process, logs them as ``data/pairs_seen``, ``data/bad_samples`` and
``data/pairs_repeated``, and says them in one line per epoch.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from adaptalign.datamodules.shard_stream import COUNTERS
from adaptalign.lightning_modules.gather import all_reduce_sum


class StreamCounts(L.Callback):
    """Sums the pairs, bad samples and repeats of streamed training batches per epoch.

    Batches without the counters (a map-style loader's) leave it silent. The sums stay tensors
    on the batch's device until the epoch ends, so a step never waits on the device for them.
    """

    def __init__(self) -> None:
        self.totals: torch.Tensor | None = None  # pairs, bad samples, repeats; None: not streamed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.totals = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not isinstance(batch, dict) or COUNTERS[0] not in batch:
            return
        bad, repeated = (batch[name] for name in COUNTERS)
        counts = torch.stack([bad.new_tensor(len(batch["index"])), bad, repeated]).long()
        self.totals = counts if self.totals is None else self.totals + counts

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every process streams or none does: the loader is the same data module's on each.
        if self.totals is None:
            return
        pairs, bad, repeated = (int(v) for v in all_reduce_sum(self.totals))
        for name, value in (
            ("pairs_seen", pairs),
            ("bad_samples", bad),
            ("pairs_repeated", repeated),
        ):
            pl_module.log(f"data/{name}", float(value), on_step=False, on_epoch=True)
        rank_zero_info(
            f"epoch {trainer.current_epoch}: {pairs} pairs streamed, {bad} bad samples skipped, "
            f"{repeated} repeated to keep the processes in step"
        )
