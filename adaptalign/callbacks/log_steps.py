"""When a callback's per-step scalars are worth logging at all."""

from __future__ import annotations

import lightning as L


def writes_logs(trainer: L.Trainer | None) -> bool:
    """Whether Lightning writes the logs of the training batch about to run; True outside a trainer.

    Call it in ``on_train_batch_start``. A ``log`` call costs about as much as a callback's own
    arithmetic, and on-step values of the other batches are never written, so the adaptive
    callbacks log only on the batches that are: every ``log_every_n_steps``-th optimiser step
    (``global_step`` counts the steps before this batch's), and the batch a stop was asked on.
    """
    if not isinstance(trainer, L.Trainer):
        return True
    every = trainer.log_every_n_steps
    if every == 0:
        return False
    return (trainer.global_step + 1) % every == 0 or trainer.should_stop


def still_writes(trainer: L.Trainer | None, decided: bool) -> bool:
    """In ``on_train_batch_end``: what :func:`writes_logs` said at the batch's start, or a stop
    asked for since (Lightning writes the last batch's logs). The step counter has moved on by then.
    """
    return decided or (isinstance(trainer, L.Trainer) and trainer.should_stop)
