"""What a command prints when it ends: the retrieval table, rounded, and where its files went.

``fit`` ends with the last and the best validation (by ``val/rsum``) side by side, the checkpoint
files and the log folder, instead of a progress bar. ``validate`` and ``test`` print their metrics
with two decimals (Lightning's own table, which prints ``96.4000015258789``, is turned off by the
command line's ``--verbose false`` default).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from adaptalign.callbacks.run_summary import best_entry
from adaptalign.lightning_modules.metric_names import RSUM

FIRST = RSUM  # the sum of all R@K, which checkpoints are selected by, heads every table


def metrics(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The metrics under ``prefix`` (``val/``, ``test/``) as floats, ``rsum`` first, prefix kept."""
    found = {key: float(value) for key, value in values.items() if key.startswith(prefix)}
    first = f"{prefix}{FIRST}"
    return ({first: found.pop(first)} if first in found else {}) | found


def table(columns: Mapping[str, Mapping[str, float]]) -> str:
    """Metric names down the side, one column per heading, values with two decimals."""
    names = list(dict.fromkeys(name for column in columns.values() for name in column))
    side = max(len("metric"), *(len(name) for name in names))
    widths = [max(len(heading), 8) for heading in columns]
    rows = [
        "  ".join(
            ["metric".ljust(side), *(h.rjust(w) for h, w in zip(columns, widths, strict=True))]
        )
    ]
    for name in names:
        cells = [
            (f"{column[name]:.2f}" if name in column else "-").rjust(width)
            for column, width in zip(columns.values(), widths, strict=True)
        ]
        rows.append("  ".join([name.ljust(side), *cells]))
    return "\n".join(rows)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def without_epoch(entry: Mapping[str, Any]) -> dict[str, float]:
    return {key: value for key, value in entry.items() if key != "epoch"}


def checkpoint_lines(trainer: L.Trainer) -> list[str]:
    """``best by val/rsum: path`` and ``last: path`` for every checkpoint callback that saved."""
    lines = []
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "best_model_path", "")
        if path:
            monitor = getattr(callback, "monitor", None)
            lines.append(f"  {f'best by {monitor}' if monitor else 'last'}: {path}")
        last = getattr(callback, "last_model_path", "")
        if last:
            lines.append(f"  last: {last}")
    return list(dict.fromkeys(lines))


class FinalReport(L.Callback):
    """Prints the end-of-command report; keeps the validation history of ``fit`` in checkpoints,
    so a resumed run still reports its best validation across all its attempts."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    # on_validation_end, not on_validation_epoch_end: callbacks' epoch-end hooks run before the
    # module's, where the retrieval metrics are computed and logged.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        found = metrics(trainer.callback_metrics, "val/")
        if trainer.state.fn == TrainerFn.FITTING:
            self.history.append({"epoch": trainer.current_epoch, **found})
        elif trainer.is_global_zero and found:
            print(f"validate results\n{table({'value': found})}")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        found = metrics(trainer.callback_metrics, "test/")
        if trainer.is_global_zero and found:
            print(f"test results\n{table({'value': found})}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # on every rank: Lightning broadcasts it
        if not trainer.is_global_zero:
            return
        epochs, steps = trainer.current_epoch, trainer.global_step
        lines = [f"fit ended after {plural(epochs, 'epoch')} ({plural(steps, 'step')})"]
        if self.history:
            last = self.history[-1]
            best = best_entry(self.history, key=f"val/{FIRST}") or last
            columns = {
                f"last (epoch {last['epoch']})": without_epoch(last),
                f"best (epoch {best['epoch']})": without_epoch(best),
            }
            lines.append(table(columns))
        checkpoints = checkpoint_lines(trainer)
        if checkpoints:
            lines += ["checkpoints:", *checkpoints]
        if log_dir:  # none under fast_dev_run
            lines.append(f"logs and config: {log_dir}")
        print("\n".join(lines))

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
