"""What a command prints when it ends: the retrieval table, rounded, and where its files went.

``fit`` ends with the last and the best validation (by ``val/rsum``) side by side, the checkpoint
files and the log folder, instead of a progress bar. ``validate`` and ``test`` print their metrics
with two decimals (Lightning's own table, which prints ``96.4000015258789``, is turned off by the
command line's ``--verbose false`` default). A ``fit`` followed by the report split's evaluation
(``data.selection_images``) prints its table when that ends, with the report beside the validations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from adaptalign.callbacks.run_summary import best_entry
from adaptalign.lightning_modules.metric_names import RSUM

FIRST = RSUM  # the sum of all R@K, which checkpoints are selected by, heads every table
# The end of fit's report while it waits for the report split's evaluation.
Pending = tuple[list[str], dict[str, dict[str, float]], list[str], dict[str, int]]


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


def unprefixed(values: Mapping[str, float], prefix: str) -> dict[str, float]:
    """``val/rsum`` as ``rsum``: columns of two splits share their rows."""
    return {key.removeprefix(prefix): value for key, value in values.items()}


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
        # Set by the command line when the report split's evaluation follows fit; the end of
        # fit's report waits for it: lines above the table, its columns, lines below, and the
        # epochs of the best and the last validation.
        self.report_follows = False
        self.pending: Pending | None = None

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
        if self.pending is not None:
            head, columns, tail, epochs = self.pending
            self.pending = None
            # the best checkpoint by val/rsum was loaded; without one, the model fit left
            epoch = epochs.get("best" if trainer.ckpt_path else "last", "?")
            columns = {
                **{f"val, {name}": unprefixed(c, "val/") for name, c in columns.items()},
                f"test, report (epoch {epoch})": unprefixed(found, "test/"),
            }
            head = [*head, "selected on val (the selection split), reported once on test:"]
            if trainer.is_global_zero:
                print("\n".join([*head, table(columns), *tail]))
        elif trainer.is_global_zero and found:
            print(f"test results\n{table({'value': found})}")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """A failed report evaluation still shows what fit printed at its end."""
        if self.pending is not None and trainer.is_global_zero:
            head, columns, tail, _ = self.pending
            print("\n".join([*head, *([table(columns)] if columns else []), *tail]))
        self.pending = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # on every rank: Lightning broadcasts it
        if not trainer.is_global_zero:
            return
        epochs, steps = trainer.current_epoch, trainer.global_step
        lines = [f"fit ended after {plural(epochs, 'epoch')} ({plural(steps, 'step')})"]
        columns: dict[str, dict[str, float]] = {}
        epochs: dict[str, int] = {}
        if self.history:
            last = self.history[-1]
            best = best_entry(self.history, key=f"val/{FIRST}") or last
            columns = {
                f"last (epoch {last['epoch']})": without_epoch(last),
                f"best (epoch {best['epoch']})": without_epoch(best),
            }
            epochs = {"best": best["epoch"], "last": last["epoch"]}
        tail: list[str] = []
        checkpoints = checkpoint_lines(trainer)
        if checkpoints:
            tail += ["checkpoints:", *checkpoints]
        if log_dir:  # none under fast_dev_run
            tail.append(f"logs and config: {log_dir}")
        if self.report_follows:
            self.pending = (lines, columns, tail, epochs)
            return
        print("\n".join([*lines, *([table(columns)] if columns else []), *tail]))

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
