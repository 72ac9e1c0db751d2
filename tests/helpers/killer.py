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


class KillOnceAt(KillAt):
    """:class:`KillAt`, but only while the folder ``marker`` does not exist (it makes it): the first
    attempt of a run dies as on a pre-empted machine, the next one goes on. A folder, since the
    arguments of a run that name files are part of its setting (see ``same_setting``)."""

    def __init__(self, step: int, marker: str) -> None:
        super().__init__(step)
        self.marker = marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not os.path.exists(self.marker):
            os.mkdir(self.marker)
            os.kill(os.getpid(), signal.SIGKILL)
