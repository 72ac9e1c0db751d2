"""``adaptalign SUBCOMMAND ...``: one table of subcommands and one exit-status policy.

Each subcommand's module is imported only when it runs, so ``adaptalign --help`` answers without
loading torch or Lightning. Whatever the subcommand, a setting or file that cannot be used ends
it with one line ``adaptalign: error: ...`` and exit status 2; a run whose loss stopped being
finite exits with status 1 (its message says where); success is 0.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from adaptalign import __version__
from adaptalign.common.allocator import keep_freed_memory
from adaptalign.common.exit_status import PROG, error_line, reported_status


@dataclass(frozen=True)
class Subcommand:
    """Where a subcommand's ``main(argv)`` lives and the line ``--help`` shows for it.

    ``whole_argv``: the Lightning subcommands parse the subcommand name themselves.
    """

    module: str
    summary: str
    whole_argv: bool = False

    def entry(self) -> Callable[[list[str]], int | None]:
        return importlib.import_module(self.module).main


LIGHTNING = "adaptalign.lightning_cli.cli"
SUBCOMMANDS: dict[str, Subcommand] = {
    "fit": Subcommand(LIGHTNING, "train a system from YAML configs (Lightning CLI)", True),
    "validate": Subcommand(LIGHTNING, "retrieval metrics of a checkpoint on the val split", True),
    "test": Subcommand(LIGHTNING, "retrieval metrics of a checkpoint on the test split", True),
    "predict": Subcommand(LIGHTNING, "write a split's image and caption embeddings", True),
    "compare": Subcommand(
        "adaptalign.experiments.compare", "methods over seeds and sizes, in parallel, resumable"
    ),
    "tune": Subcommand(
        "adaptalign.experiments.tune", "hyperparameter search: Ray Tune, Optuna TPE, ASHA"
    ),
    "stress": Subcommand("adaptalign.experiments.stress", "a checkpoint evaluated under noise"),
    "tsne": Subcommand("adaptalign.experiments.tsne", "a t-SNE view of a predict embedding file"),
    "shards": Subcommand(
        "adaptalign.experiments.shards", "a data set written as WebDataset shards, to stream"
    ),
    "report": Subcommand(
        "adaptalign.experiments.report", "docs/RESULTS.md and the README summary, rebuilt"
    ),
}


def usage() -> str:
    width = max(len("-h, --help"), *map(len, SUBCOMMANDS))
    lines = [
        f"usage: {PROG} SUBCOMMAND [options]   ({PROG} SUBCOMMAND --help for its options)",
        "",
        "Data-efficient image-text alignment with adaptive contrastive training.",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {command.summary}" for name, command in SUBCOMMANDS.items()),
        "",
        "options:",
        f"  {'-h, --help':<{width}}  show this message and exit",
        f"  {'--version':<{width}}  show the version and exit",
    ]
    return "\n".join(lines)


def fail(message: str, code: int = 2) -> SystemExit:
    print(error_line(message), file=sys.stderr)
    return SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: the subcommand's exit status (errors raise ``SystemExit``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        raise fail("expected a subcommand")
    if args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] == "--version":
        print(f"{PROG} {__version__}")
        return 0
    command = SUBCOMMANDS.get(args[0])
    if command is None:
        close = difflib.get_close_matches(args[0], SUBCOMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        known = ", ".join(SUBCOMMANDS)
        raise fail(f"unknown subcommand {args[0]!r}{hint}; expected one of {known}")
    # Idle OpenMP threads sleep instead of spinning: a run shares its cores with Ray and whatever
    # else the machine runs, and spinning threads take turns from the threads at work (a warm
    # 15-epoch frozen-feature run on 2 busy cores: 8 s instead of 35-48 s). Set before torch
    # loads OpenMP; Ray workers and fits started from here inherit it; a user's own value stays.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Large tensors' memory is reused instead of page-faulted in at every step (4.5x on a frozen
    # image tower's forward on CPU); see adaptalign.common.allocator. The same for children.
    keep_freed_memory()
    try:
        code = command.entry()(args if command.whole_argv else args[1:])
    except Exception as exc:
        status = reported_status(exc)
        if status is None:
            raise
        raise SystemExit(status) from exc
    return code or 0


if __name__ == "__main__":
    raise SystemExit(main())
