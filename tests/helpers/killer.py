"""A callback that kills its own process the hard way, as a pre-empted or out-of-memory job dies.

Used on the command line by the resume tests
(``--trainer.callbacks+=tests.helpers.killer.KillAt``); the repository root is on ``sys.path``
there because they run ``python -m adaptalign`` from it.
"""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAt(L.Callback):
    """SIGKILL at the start of the batch after optimiser step ``step``.

    Checkpoints of step ``step`` are written at the end of its batch, so they are on disk; nothing
    (no ``finally``, no Lightning shutdown hook) runs after the signal.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
