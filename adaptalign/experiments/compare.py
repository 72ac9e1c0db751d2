"""``adaptalign compare``: train configs over seeds and training-set sizes, then report the spread.

Every config is crossed with every training-set size and seed; each run is an ordinary
``adaptalign fit`` in ``OUTPUT/runs/<name>/n<train images>/seed<seed>``. Re-running the same command
skips finished runs, so an interrupted comparison resumes. Runs go seed by seed, so a complete
single-seed comparison is available early.

The report (``results.csv``, ``results.md``, ``results.png``) takes from each run its best
validation by rsum. That is model selection on the validation split itself (a dev figure, slightly
optimistic); the CSV also holds the last validation's rsum for comparison. Runs with a selection
split (``--override --data.selection_images=N``) are reported on the report split instead, and
the table's header line says which split each number is on.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adaptalign.common.arguments import CommandParser
from adaptalign.common.atomic_files import atomic_save
from adaptalign.experiments.compare_results import markdown_table, splits_line, write_results
from adaptalign.experiments.compare_runs import (
    Run,
    discover_runs,
    finished_rows,
    fit_command,
    report_order,
    run_all,
)
from adaptalign.experiments.compare_settings import (
    OVERRIDE_OPTIONS,
    config_parts,
    parse_train_images,
    plan,
    resolve_settings,
    settings_document,
    split_overrides,
)
from adaptalign.experiments.compare_stress import run_stress, write_stress_report
from adaptalign.experiments.paired import paired_sections, paired_text
from adaptalign.experiments.ray_pool import add_placement_arguments, placement_from, ray_session


class CompareParser(CommandParser):
    """Remembers its option strings: a list of ``--override`` arguments ends at the next one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.option_names: set[str] = set()  # before ``__init__`` adds ``--help``
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        self.option_names.update(name for name in names if name.startswith("-"))
        return super().add_argument(*names, **kwargs)


def build_parser() -> CompareParser:
    """The options; ``--override`` is listed for the help but split off before parsing."""
    parser = CompareParser(
        prog="adaptalign compare",
        description="Train run configs over seeds and training-set sizes, then report mean, "
        "standard deviation and 95% intervals over seeds.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a YAML file with any of: configs, names, seeds, train_images, output, overrides; "
        "command-line options replace its values, --override arguments are added after its own",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        metavar="FIT_YAML",
        help="adaptalign fit configs; layer several as a.yaml+b.yaml",
    )
    parser.add_argument(
        "--names", "--name", nargs="+", help="one name per config (default: file stems)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0 1 2 3 4)")
    parser.add_argument(
        "--baseline",
        metavar="NAME",
        nargs="+",
        help="the config(s) paired statistics compare the others with (default: the first; "
        "'none': no paired statistics)",
    )
    parser.add_argument(
        "--report-split",
        choices=("test", "none"),
        help="the split each run is evaluated on once, with the checkpoint selected on val "
        "(default: test; 'none' reports the selection figure)",
    )
    parser.add_argument(
        "--train-images",
        nargs="+",
        type=parse_train_images,
        metavar="N",
        help="training-set sizes: counts, fractions or 'all' (default: the full train split)",
    )
    parser.add_argument("--output", metavar="DIR", help="folder for runs and results")
    parser.add_argument(
        "--override",
        nargs="*",
        metavar="ARG",
        help="adaptalign fit arguments added to every run, up to the next option of this "
        "command; arguments after a bare -- are added as well",
    )
    parser.add_argument(
        "--stress-rates",
        nargs="+",
        type=float,
        metavar="RATE",
        help="after the fits, evaluate each run's best checkpoint at these noise rates",
    )
    parser.add_argument(
        "--stress-modality",
        choices=("text", "image", "both"),
        help="what the stress test perturbs (default: both)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    add_placement_arguments(parser)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only aggregate finished runs (all under OUTPUT/runs when no configs are given)",
    )
    return parser


def write_report(
    output: Path,
    runs: list[Run],
    names: Sequence[str] | None = None,
    baselines: Sequence[str] = (),
) -> bool:
    """Writes the results of the finished runs; False when none has finished yet."""
    rows = finished_rows(report_order(runs, names))
    if not rows:
        print(f"no finished runs under {output / 'runs'}; nothing to report", flush=True)
        return False
    paired = paired_sections(rows, baselines)
    groups = write_results(output, rows, paired=paired)
    splits = splits_line(rows)
    heading = f"\n{splits}:" if splits else ""  # which split the numbers are on
    print(f"{heading}\n{markdown_table(groups)}", flush=True)
    if paired:
        print(paired_text(paired), flush=True)
    print(f"wrote {output / 'results.csv'}, results.md and results.png ({len(rows)} runs)")
    return True


# ----------------------------------------------------------------------------- command line


def own_options(parser: CompareParser) -> set[str]:
    """This command's option strings: where a list of ``--override`` arguments ends."""
    return parser.option_names - set(OVERRIDE_OPTIONS)


def main(argv: Sequence[str] | None = None) -> None:
    """``adaptalign compare ...``; exits 2 on bad options and 1 when any run failed."""
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    own, overrides = split_overrides(arguments, own_options(parser))
    options = parser.parse_args(own)
    try:
        settings = resolve_settings(options, overrides)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    if options.report_only:
        runs = plan(settings) if settings.configs else discover_runs(settings.output)
        write_report(settings.output, runs, settings.names or None, settings.baselines)
        write_stress_report(settings.output, runs, settings.stress_modality)
        return
    if not settings.configs:
        parser.error("no run configs; give --configs A.yaml ... or a --config file with configs")
    missing = [p for c in settings.configs for p in config_parts(c) if not Path(p).is_file()]
    if missing:
        parser.error(f"config file(s) not found: {', '.join(missing)}")
    placement = placement_from(options)
    runs = plan(settings)
    if options.dry_run:
        print_plan(runs, settings.fit_overrides)
        return

    settings.output.mkdir(parents=True, exist_ok=True)
    atomic_save(settings.output / "comparison.yaml", settings_document(settings))
    to_go = sum(not run.finished() for run in runs)
    print(f"{len(runs)} runs, {to_go} to go; output {settings.output}", flush=True)
    # One Ray for the fits and the stress evaluations, started only when there is work.
    work = to_go > 0 or bool(settings.stress_rates)
    with ray_session(placement.address) if work else contextlib.nullcontext():
        failures = run_all(runs, settings.fit_overrides, placement)
        write_report(settings.output, runs, settings.names, settings.baselines)
        if settings.stress_rates:
            run_stress(runs, settings.stress_rates, settings.stress_modality, placement)
            write_stress_report(settings.output, runs, settings.stress_modality)
    if failures:
        print(f"\n{len(failures)} of {len(runs)} runs failed:", file=sys.stderr)
        for outcome in failures:
            print(
                f"- {outcome.run.label}: {outcome.reason}, log {outcome.run.log_path}",
                file=sys.stderr,
            )
            for line in outcome.log_tail:
                print(f"    {line}", file=sys.stderr)
        raise SystemExit(1)


def print_plan(runs: list[Run], overrides: Sequence[str]) -> None:
    print(f"{len(runs)} runs ({sum(run.finished() for run in runs)} finished):")
    for index, run in enumerate(runs):
        status = "finished" if run.finished() else "to run"
        print(f"[{index + 1}/{len(runs)}] {run.label} ({status})")
        print(f"    {shlex.join(fit_command(run, overrides))}")
