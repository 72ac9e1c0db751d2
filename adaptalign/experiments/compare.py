"""``adaptalign compare``: train configs over seeds and training-set sizes, then report the spread.

Every config is crossed with every training-set size and seed; each run is an ordinary
``adaptalign fit`` in ``OUTPUT/runs/<name>/n<train images>/seed<seed>``. Re-running the same command
skips finished runs, so an interrupted comparison resumes. Runs go seed by seed, so a complete
single-seed comparison is available early.

The report (``results.csv``, ``results.md``, ``results.png``) takes from each run its best
validation by rsum. That is model selection on the validation split itself (a dev figure, slightly
optimistic); the CSV also holds the last validation's rsum for comparison.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adaptalign.common.atomic_files import atomic_save
from adaptalign.experiments.compare_results import markdown_table, write_results
from adaptalign.experiments.compare_runs import (
    Run,
    TrainImages,
    discover_runs,
    finished_rows,
    fit_command,
    report_order,
    run_all,
    size_label,
)
from adaptalign.experiments.compare_stress import run_stress, write_stress_report

SETTINGS = (
    "configs",
    "names",
    "seeds",
    "train_images",
    "output",
    "overrides",
    "stress_rates",
    "stress_modality",
)
SETTING_ALIASES = {"name": "names", "override": "overrides", "seed": "seeds"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
OVERRIDE_OPTIONS = ("--override", "--overrides")


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """One comparison: every config crossed with every training size and seed."""

    configs: list[str]
    names: list[str]
    seeds: list[int]
    train_images: list[TrainImages]
    output: Path
    overrides: list[str]
    stress_rates: list[float] = field(default_factory=list)
    stress_modality: str = "both"


def parse_train_images(text: str | int | float | None) -> TrainImages:
    """A count, a fraction in (0, 1], or ``all``/``null`` for the full train split."""
    if text is None:
        return None
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f"train images {text!r}: expected a count or a fraction")
    if isinstance(text, int | float):
        return text
    if text.strip().lower() in ("all", "full", "none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"train images {text!r}: expected a count, fraction or 'all'")


def split_overrides(argv: Sequence[str], own_options: set[str]) -> tuple[list[str], list[str]]:
    """Separates ``adaptalign fit`` arguments from the comparison's own.

    argparse would take ``--trainer.max_epochs=3`` for an unknown option, so everything after
    ``--override`` up to the next option of this command is passed through untouched, as is
    everything after ``--``.
    """
    own: list[str] = []
    overrides: list[str] = []
    collecting = False
    for index, token in enumerate(argv):
        if token == "--":
            overrides.extend(argv[index + 1 :])
            break
        option = token.split("=", 1)[0]
        if option in OVERRIDE_OPTIONS:
            collecting = "=" not in token
            if not collecting:
                overrides.append(token.split("=", 1)[1])
            continue
        if collecting and option not in own_options:
            overrides.append(token)
            continue
        collecting = False
        own.append(token)
    return own, overrides


def build_parser() -> argparse.ArgumentParser:
    """The options; ``--override`` is listed for the help but split off before parsing."""
    parser = argparse.ArgumentParser(
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
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0)")
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
        "--jobs",
        type=int,
        default=1,
        help="runs at a time (default 1); more pays off when runs are short or leave cores idle",
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
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only aggregate finished runs (all under OUTPUT/runs when no configs are given)",
    )
    return parser


def read_settings_file(path: str) -> dict[str, Any]:
    """The comparison file's keys, normalised to the option names (``train-images`` and so on)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--config {path}: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings")
    values: dict[str, Any] = {}
    for key, value in loaded.items():
        normal = str(key).replace("-", "_")
        normal = SETTING_ALIASES.get(normal, normal)
        if normal not in SETTINGS:
            raise ValueError(f"--config {path}: unknown key {key!r}; expected one of {SETTINGS}")
        values[normal] = value
    return values


def config_entry(value: Any) -> str:
    """A run's config: one path, or several layered as by repeated ``--config`` (a+b)."""
    return "+".join(str(v) for v in value) if isinstance(value, list) else str(value)


def config_parts(entry: str) -> list[str]:
    return entry.split("+")


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _configs_and_names(
    file: dict[str, Any], options: argparse.Namespace
) -> tuple[list[str], list[str]]:
    """Config paths and one distinct, path-safe name each (file stems unless named)."""
    configs: list[str] = []
    given: list[str | None] = []
    for entry in _as_list(file.get("configs", [])):
        if isinstance(entry, dict):  # {name: ..., config: ...}
            if "config" not in entry:
                raise ValueError(f"configs entry {entry!r}: expected a 'config' key")
            configs.append(config_entry(entry["config"]))
            given.append(entry.get("name"))
        else:
            configs.append(config_entry(entry))
            given.append(None)
    if options.configs is not None:
        configs, given = list(options.configs), [None] * len(options.configs)

    names = options.names if options.names is not None else file.get("names")
    if names is None:
        names = [
            name or Path(config_parts(c)[-1]).stem for name, c in zip(given, configs, strict=True)
        ]
    names = [str(n) for n in _as_list(names)]
    if len(names) != len(configs):
        raise ValueError(f"{len(names)} names for {len(configs)} configs; give one per config")
    if len(set(names)) != len(names):
        raise ValueError(f"names {names} repeat; give distinct ones with --names")
    for name in names:
        if not SAFE_NAME.match(name):
            raise ValueError(f"name {name!r}: use letters, digits, '.', '_', '+', '-'")
    return configs, names


def _seeds_and_sizes(
    file: dict[str, Any], options: argparse.Namespace
) -> tuple[list[int], list[TrainImages]]:
    seeds = options.seeds if options.seeds is not None else file.get("seeds", [0])
    try:
        seeds = [int(s) for s in _as_list(seeds)]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"seeds {seeds!r}: expected integers") from exc
    sizes = options.train_images
    if sizes is None:
        sizes = [parse_train_images(v) for v in _as_list(file.get("train_images", [None]))]
    if any(seed < 0 for seed in seeds):
        raise ValueError(f"seeds {seeds}: expected integers >= 0")
    if any(size is not None and size <= 0 for size in sizes):
        raise ValueError(f"train images {sizes}: expected counts >= 1 or fractions in (0, 1]")
    for values, what in ((seeds, "seeds"), ([size_label(s) for s in sizes], "train images")):
        if len(set(values)) != len(values):
            raise ValueError(f"{what} {values} repeat")
    return seeds, list(sizes)


def resolve_settings(options: argparse.Namespace, overrides: list[str]) -> Settings:
    """The comparison file overlaid with the command line; ``--override`` arguments come last."""
    file = read_settings_file(options.config) if options.config else {}
    configs, names = _configs_and_names(file, options)
    seeds, sizes = _seeds_and_sizes(file, options)
    output = options.output if options.output is not None else file.get("output")
    if output is None:
        raise ValueError("no output folder; give --output DIR")
    file_overrides = [str(a) for a in _as_list(file.get("overrides", []))]
    rates = options.stress_rates
    if rates is None:
        rates = [float(r) for r in _as_list(file.get("stress_rates", []))]
    if any(not 0 <= r <= 1 for r in rates):
        raise ValueError(f"stress rates {rates}: expected values in [0, 1]")
    modality = options.stress_modality or str(file.get("stress_modality", "both"))
    if modality not in ("text", "image", "both"):
        raise ValueError(f"stress modality {modality!r}: expected text, image or both")
    return Settings(
        configs,
        names,
        seeds,
        sizes,
        Path(str(output)),
        file_overrides + overrides,
        list(rates),
        modality,
    )


def settings_document(settings: Settings) -> str:
    """The comparison as a file for ``--config``, saved beside its results to reproduce it."""
    document = {
        "configs": [
            {"name": n, "config": c} for n, c in zip(settings.names, settings.configs, strict=True)
        ],
        "seeds": settings.seeds,
        "train_images": [size_label(s) if s is None else s for s in settings.train_images],
        "output": str(settings.output),
        "overrides": settings.overrides,
    }
    if settings.stress_rates:
        document["stress_rates"] = settings.stress_rates
        document["stress_modality"] = settings.stress_modality
    return yaml.safe_dump(document, sort_keys=False)


# ----------------------------------------------------------------------------- running


def plan(settings: Settings) -> list[Run]:
    """All runs, seed by seed, so that one complete seed of the comparison finishes first."""
    return [
        Run(
            name,
            config,
            size,
            seed,
            settings.output / "runs" / name / f"n{size_label(size)}" / f"seed{seed}",
        )
        for seed in settings.seeds
        for size in settings.train_images
        for name, config in zip(settings.names, settings.configs, strict=True)
    ]


def write_report(output: Path, runs: list[Run], names: Sequence[str] | None = None) -> bool:
    """Writes the results of the finished runs; False when none has finished yet."""
    rows = finished_rows(report_order(runs, names))
    if not rows:
        print(f"no finished runs under {output / 'runs'}; nothing to report", flush=True)
        return False
    groups = write_results(output, rows)
    print(f"\n{markdown_table(groups)}", flush=True)
    print(f"wrote {output / 'results.csv'}, results.md and results.png ({len(rows)} runs)")
    return True


# ----------------------------------------------------------------------------- command line


def own_options(parser: argparse.ArgumentParser) -> set[str]:
    """This command's option strings: where a list of ``--override`` arguments ends."""
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option not in OVERRIDE_OPTIONS
    }


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
        write_report(settings.output, runs, settings.names or None)
        write_stress_report(settings.output, runs, settings.stress_modality)
        return
    if not settings.configs:
        parser.error("no run configs; give --configs A.yaml ... or a --config file with configs")
    missing = [p for c in settings.configs for p in config_parts(c) if not Path(p).is_file()]
    if missing:
        parser.error(f"config file(s) not found: {', '.join(missing)}")
    if options.jobs < 1:
        parser.error(f"--jobs {options.jobs}: expected >= 1")
    runs = plan(settings)
    if options.dry_run:
        print_plan(runs, settings.overrides)
        return

    settings.output.mkdir(parents=True, exist_ok=True)
    atomic_save(settings.output / "comparison.yaml", settings_document(settings))
    to_go = sum(not run.finished() for run in runs)
    print(f"{len(runs)} runs, {to_go} to go; output {settings.output}", flush=True)
    failures = run_all(runs, settings.overrides, options.jobs)
    write_report(settings.output, runs, settings.names)
    if settings.stress_rates:
        run_stress(runs, settings.stress_rates, settings.stress_modality)
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
