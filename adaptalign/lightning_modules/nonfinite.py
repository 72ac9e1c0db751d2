"""What the error of a non-finite training loss says: the controls in force, where to go on from."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from adaptalign.lightning_modules.controls import Controls


def controls_in_force(
    controls: Controls, criterion: str, temperature: float, margin: float
) -> dict[str, object]:
    """The step's controls, with the system's own ``temperature`` and ``margin``, marked
    ``(model)``, where no callback set one; InfoNCE shows no margin unless one was set."""
    shown = controls.describe()
    if controls.temperature is None:
        shown["temperature"] = f"{temperature:.4g} (model)"
    if criterion == "max_margin":
        if controls.margin is None:
            shown["margin"] = f"{margin:g} (model)"
    elif controls.margin is None:
        del shown["margin"]  # InfoNCE has no margin
    return shown


def checkpoint_note(trainer: L.Trainer | None) -> str:
    """Which checkpoint to go on from: the newest one this run wrote or resumed from, if any.

    Every step before the failing one had a finite loss, so every checkpoint written so far is
    good.
    """
    paths = []
    for callback in trainer.checkpoint_callbacks if trainer is not None else []:
        paths += [getattr(callback, name, "") for name in ("last_model_path", "best_model_path")]
    written = [Path(p) for p in paths if p and Path(p).is_file()]
    if not written:
        return "no checkpoint had been written yet."
    newest = max(written, key=lambda p: p.stat().st_mtime_ns)
    return f"every checkpoint written so far is from a good step; the newest is {newest}."
