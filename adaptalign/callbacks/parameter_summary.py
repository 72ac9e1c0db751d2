"""Lightning's model summary at the start of ``fit``, without its FLOPs column and total.

Lightning counts FLOPs only for a model with an example input, which the alignment system has none
of (its inputs are an image batch and a tokenized caption batch), so the summary read ``FLOPs 0``
for every layer and ``Total FLOPs: 0``: a figure that looks measured and is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import Callback, ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count

DROPPED = "FLOPs"


class ParameterSummary(ModelSummary):
    """Layers with their parameter counts and mode, then the totals; no FLOPs."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, [str(v) for v in values]) for name, values in summary_data]
        columns = [(name, values) for name, values in columns if name != DROPPED]
        widths = [max([len(name), *(len(v) for v in values)]) for name, values in columns]
        lines = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths, strict=True))]
        for row in range(len(columns[0][1]) if columns else 0):
            cells = (values[row].ljust(w) for (_, values), w in zip(columns, widths, strict=True))
            lines.append(" | ".join(cells))
        frozen = total_parameters - trainable_parameters
        totals = [
            (get_human_readable_count(trainable_parameters), "trainable parameters"),
            (get_human_readable_count(frozen), "non-trainable parameters"),
            (get_human_readable_count(total_parameters), "parameters in all"),
            (f"{model_size:,.1f} MB", "of parameters"),
            (str(total_training_modes.get("eval", 0)), "modules in eval mode"),
        ]
        lines += [f"{value:>10} {label}" for value, label in totals]
        print("\n".join(lines))


def with_parameter_summary(
    trainer_config: dict[str, Any], callbacks: Sequence[Callback]
) -> dict[str, Any]:
    """Trainer arguments that put :class:`ParameterSummary` in place of Lightning's summary.

    ``callbacks`` are all the trainer will get (the methods and the config's own); the summary
    is added to them. Nothing changes when the summary is turned off or the user chose a summary
    callback.
    """
    callbacks = list(callbacks)
    if trainer_config.get("enable_model_summary") is False or trainer_config.get("barebones"):
        return {"callbacks": callbacks}
    if any(isinstance(callback, ModelSummary) for callback in callbacks):
        return {"callbacks": callbacks}
    return {"callbacks": [*callbacks, ParameterSummary()], "enable_model_summary": False}
