"""A tiny system (0.4M-parameter timm CNN at 32 px, the tiny local BERT) for fast tests."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from adaptalign.callbacks.model_inputs import ModelInputsLink
from adaptalign.lightning_modules.system import AlignmentModule

# The four method overlays layered: the combined configuration (MM-TS, loss weights, TOnICS, ARL).
COMBINED_METHODS = [
    str(Path(__file__).parents[2] / "configs" / "methods" / f"{name}.yaml")
    for name in ("mmts_infonce", "loss_weight_variance", "tonics", "arl", "arl_short")
]


def tiny_module(
    text_model: str,
    seed: int = 0,
    image: dict | None = None,
    text: dict | None = None,
    **settings: object,
) -> AlignmentModule:
    """``image`` / ``text`` update the tower settings (e.g. ``{"freeze": True}``)."""
    torch.manual_seed(seed)
    settings = {"embed_dim": 16, **settings}
    return AlignmentModule(
        image_tower={"model_name": "test_resnet", "image_size": 32, **(image or {})},
        text_tower={"model_name": text_model, **(text or {})},
        **settings,
    )


def quiet_trainer(**settings: object) -> L.Trainer:
    """A CPU trainer without logger, progress bar, summary or checkpoints unless asked for.

    Like the command line's, it hands the system's inputs to the data module (``ModelInputsLink``
    after the given callbacks).
    """
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    given = settings.pop("callbacks", None) or []
    callbacks = [*given, ModelInputsLink()]  # type: ignore[misc]
    return L.Trainer(**{**defaults, **settings}, callbacks=callbacks)


def final_validation(version: Path) -> dict[str, tuple[int, float]]:
    """The last logged value of every ``val/`` scalar in a TensorBoard folder, with its step."""
    events = EventAccumulator(str(version))
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("val/")]
    return {t: (events.Scalars(t)[-1].step, events.Scalars(t)[-1].value) for t in tags}
