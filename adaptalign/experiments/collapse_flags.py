"""Runs of a comparison that collapsed: flagged and listed in its results, not averaged in silently.

:class:`~adaptalign.callbacks.collapse_watch.CollapseWatch` writes into a run's ``summary.json``
``collapsed`` (whether its *last* epoch was flagged) and ``collapse_epochs`` (every flagged epoch,
with its signs: the training loss at ``log N``, the validation rsum at chance). Here a run flagged
at *any* epoch counts as flagged: a collapse it came back from is an early sign about its setting,
and its best epoch may come from before it.

Flagged runs stay in the means. Leaving them out would raise a config's mean by hiding exactly the
seeds on which its setting failed (a method that collapses on one seed in three would look as good
as one that never does); the table names them instead, and the report lists each with its epochs
and why. Pure functions from summaries and rows to text, so each can be checked by hand; rows keep
plain text, so a row read back from ``results.csv`` gives the same answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

LOSS_SIGN = "loss at log N"
RSUM_SIGN = "rsum at chance"


def epoch_ranges(epochs: Iterable[int]) -> str:
    """Epochs as sorted runs of consecutive numbers: ``[0, 2, 3, 4, 7]`` reads ``0, 2-4, 7``."""
    spans: list[list[int]] = []
    for epoch in sorted(set(epochs)):
        if spans and epoch == spans[-1][1] + 1:
            spans[-1][1] = epoch
        else:
            spans.append([epoch, epoch])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def epochs_words(ranges: str) -> str:
    """``epoch 4`` for one epoch, else ``epochs 4-9`` (``ranges`` as :func:`epoch_ranges`)."""
    single = ranges.isdigit()
    return f"epoch{'' if single else 's'} {ranges}"


def collapse_columns(summary: dict[str, Any]) -> dict[str, Any]:
    """A row's collapse columns from its run's summary.

    ``collapsed`` is the summary's own (the last epoch flagged; ``None`` when the run did not
    watch), ``collapse_epochs`` every flagged epoch as :func:`epoch_ranges` (empty when none) and
    ``collapse_signs`` which sign flagged which epochs (``loss at log N (epochs 4-9); ...``).
    """
    records = [r for r in summary.get("collapse_epochs") or [] if isinstance(r, dict)]
    signs = []
    for sign, key in ((LOSS_SIGN, "loss_at_chance"), (RSUM_SIGN, "rsum_at_chance")):
        epochs = [int(r["epoch"]) for r in records if r.get(key) and r.get("epoch") is not None]
        if epochs:
            signs.append(f"{sign} ({epochs_words(epoch_ranges(epochs))})")
    epochs = [int(r["epoch"]) for r in records if r.get("epoch") is not None]
    return {
        "collapsed": summary.get("collapsed"),
        "collapse_epochs": epoch_ranges(epochs),
        "collapse_signs": "; ".join(signs),
    }


def _true(value: Any) -> bool:
    """A flag as a row holds it: ``True``, or ``"True"`` once read back from the CSV."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def watched(row: dict[str, Any]) -> bool:
    """Whether the run watched for a collapse (its summary says ``collapsed`` either way)."""
    return row.get("collapsed") not in (None, "")


def flagged(row: dict[str, Any]) -> bool:
    """Whether any epoch of the run was flagged, its last one included."""
    return bool(row.get("collapse_epochs")) or _true(row.get("collapsed"))


@dataclass(frozen=True)
class FlaggedRun:
    """One flagged run: where it sits in the comparison, when it was flagged and why."""

    name: str
    train_images: str
    seed: int
    epochs: str  # as :func:`epoch_ranges`; empty when only ``collapsed`` is known
    signs: str
    at_end: bool  # still flagged at its last epoch

    @property
    def cell(self) -> str:
        """``seed 3 (epochs 4-9)``, for the table's ``collapsed`` column."""
        when = epochs_words(self.epochs) if self.epochs else "last epoch"
        return f"seed {self.seed} ({when})"

    @property
    def line(self) -> str:
        """The report's line: config, size, seed, the flagged epochs, why, and how it ended."""
        size = f"{self.train_images} training images"
        when = epochs_words(self.epochs) if self.epochs else "its last epoch"
        why = f"; {self.signs}" if self.signs else ""
        end = "still flagged at its last epoch" if self.at_end else "not flagged at its last epoch"
        return f"- {self.name}, {size}, seed {self.seed}: {when}{why}; {end}"


@dataclass(frozen=True)
class GroupCollapse:
    """The collapse flags of one (config, training size) group's runs."""

    flagged: tuple[FlaggedRun, ...]
    watched: int
    runs: int


def group_collapse(members: Sequence[dict[str, Any]]) -> GroupCollapse:
    """The flagged runs of a group's rows, in their order, and how many runs watched."""
    runs = tuple(
        FlaggedRun(
            str(row["name"]),
            str(row["train_images"]),
            int(row["seed"]),
            str(row.get("collapse_epochs") or ""),
            str(row.get("collapse_signs") or ""),
            _true(row.get("collapsed")),
        )
        for row in members
        if flagged(row)
    )
    return GroupCollapse(runs, sum(watched(row) for row in members), len(members))


def _collapse_of(group: dict[str, Any]) -> GroupCollapse | None:
    return group.get("collapse")


def shows_collapse(groups: Sequence[dict[str, Any]]) -> bool:
    """Whether the table gets a ``collapsed`` column: some run watched, or some run was flagged."""
    return any((c := _collapse_of(g)) is not None and (c.watched or c.flagged) for g in groups)


def collapse_cell(group: dict[str, Any]) -> str:
    """The group's flagged seeds with their epochs, ``-`` when none; counts runs not watched."""
    collapse = _collapse_of(group)
    if collapse is None:
        return "-"
    parts = [run.cell for run in collapse.flagged]
    unwatched = collapse.runs - collapse.watched
    if unwatched:
        parts.append(f"{unwatched} not watched")
    return "; ".join(parts) or "-"


def flagged_runs(groups: Sequence[dict[str, Any]]) -> list[FlaggedRun]:
    return [run for g in groups if (c := _collapse_of(g)) is not None for run in c.flagged]


def collapse_note(groups: Sequence[dict[str, Any]]) -> str:
    """A sentence (with its leading space) for the report's introduction, when the table has a
    ``collapsed`` column; empty otherwise."""
    if not shows_collapse(groups):
        return ""
    return (
        " The `collapsed` column names the seeds flagged as collapsed at any epoch (the training "
        "loss at log N, N the batch, or the validation rsum at or below a random ranking's); "
        "they are kept in the means, since leaving failed runs out would raise a config's mean."
    )


EXPLANATION = (
    "At these epochs every training step's InfoNCE loss stayed at log N (N the batch: every "
    "similarity equal, the towers no longer telling pairs apart), or the validation rsum was at "
    "or below that of a random ranking. The runs are kept in the means and intervals above: "
    "dropping them would bias a config's mean upward by hiding the seeds on which its setting "
    "failed. Epochs count from 0."
)


def collapse_list(groups: Sequence[dict[str, Any]]) -> str:
    """One line per flagged run (:attr:`FlaggedRun.line`); empty when no run was flagged."""
    return "".join(f"{run.line}\n" for run in flagged_runs(groups))


def collapse_section(groups: Sequence[dict[str, Any]]) -> str:
    """The report's ``Collapsed runs`` section; empty when no run was flagged."""
    lines = collapse_list(groups)
    if not lines:
        return ""
    return f"\n## Collapsed runs\n\n{EXPLANATION}\n\n{lines}"


def collapse_paragraph(groups: Sequence[dict[str, Any]]) -> str:
    """The flagged runs as one paragraph and list, for a section of the results document (whose
    headings are the comparisons'); empty when no run was flagged."""
    lines = collapse_list(groups)
    if not lines:
        return ""
    return f"Collapsed runs. {EXPLANATION}\n\n{lines}"
