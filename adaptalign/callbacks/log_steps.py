"""When a callback's per-step scalars are worth logging at all."""

from __future__ import annotations

import lightning as L


def writes_logs(trainer: L.Trainer | None) -> bool:
    """Whether Lightning writes this step's logs (``log_every_n_steps``); True outside a fit.

    A ``log`` call costs about as much as a callback's own arithmetic, and on-step values of the
    other steps are never written, so the adaptive callbacks log only on the steps that are.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))
