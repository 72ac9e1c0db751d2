"""What a comparison runs: its settings (file and command line merged, checked) and its plan.

A comparison file names configs (each a list of layered config files), seeds (5 by default),
training-set sizes, the output folder, extra ``fit`` arguments, the report split and the baseline
that paired statistics compare every config with; the command line replaces its values. The plan is
one run per config, size and seed, in seed order.

Every run selects its checkpoint on ``val``; ``report_split: test`` (the default) then evaluates
it once on the report split (``data.report_split``, which a carved selection split also sets),
and the results are that evaluation. ``null`` reports the selection figure itself, as an
exploration may; ``val`` is refused, being the selection split.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adaptalign.experiments.compare_runs import Run, TrainImages, size_label

SETTINGS = (
    "configs",
    "names",
    "seeds",
    "train_images",
    "output",
    "overrides",
    "stress_rates",
    "stress_modality",
    "baseline",
    "report_split",
)
DEFAULT_SEEDS = [0, 1, 2, 3, 4]
REPORT_SPLITS = ("test",)  # what a run can report on apart from val, its selection split
UNSET = object()  # a setting given as null differs from one not given
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
    baselines: list[str] = field(default_factory=list)  # paired statistics compare with each
    report_split: str | None = "test"

    @property
    def fit_overrides(self) -> list[str]:
        """The runs' extra ``fit`` arguments: the report split's, then the comparison's own."""
        report = [f"--data.report_split={self.report_split}"] if self.report_split else []
        return report + self.overrides


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


def read_settings_file(path: str, extended_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The comparison file's keys, normalised to the option names (``train-images`` and so on).

    ``extends: OTHER.yaml`` starts from another comparison file's settings, so a variant (another
    output, a training-noise override) states only what differs: its keys replace the other
    file's, except ``overrides``, which are added after the other file's own.
    """
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--config {path}: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings")
    values: dict[str, Any] = {}
    parent = loaded.pop("extends", None)
    if parent is not None:
        here = Path(path).resolve()
        if not isinstance(parent, str):
            raise ValueError(f"--config {path}: extends {parent!r}; expected one file's path")
        if Path(parent).resolve() in (*extended_by, here):
            raise ValueError(f"--config {path}: extends {parent}, which leads back to {path}")
        if not Path(parent).is_file():
            raise ValueError(f"--config {path}: extends {parent}: no such file")
        values = read_settings_file(parent, (*extended_by, here))
    for key, value in loaded.items():
        normal = str(key).replace("-", "_")
        normal = SETTING_ALIASES.get(normal, normal)
        if normal not in SETTINGS:
            raise ValueError(
                f"--config {path}: unknown key {key!r}; expected one of {(*SETTINGS, 'extends')}"
            )
        if normal == "overrides" and normal in values:  # an empty or null list adds nothing
            value = _as_list(values[normal] or []) + _as_list(value or [])
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
    seeds = options.seeds if options.seeds is not None else file.get("seeds", DEFAULT_SEEDS)
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


def _baselines(
    file: dict[str, Any], options: argparse.Namespace, names: list[str], seeds: list[int]
) -> list[str]:
    """The configs paired statistics compare every other config with: the first by default,
    none when given as ``null``/``none``; baselines asked for by name need to be configs and 2
    seeds or more."""
    given = getattr(options, "baseline", None)
    if given is None:
        given = file.get("baseline", UNSET)
    if given is UNSET:
        return names[:1]
    given = [] if given is None else _as_list(given)
    if any(str(b).lower() in ("none", "null") for b in given):
        return []
    chosen = [str(b) for b in given]
    for name in chosen:
        if names and name not in names:
            raise ValueError(f"baseline {name!r}: expected one of the configs' names {names}")
    if chosen and len(seeds) < 2:
        raise ValueError(
            f"baseline {chosen[0]!r}: paired statistics need at least 2 seeds; got seeds {seeds}"
        )
    return list(dict.fromkeys(chosen))


def _report_split(file: dict[str, Any], options: argparse.Namespace) -> str | None:
    """The split each run is reported on once after selection on val (``None``: on val)."""
    given = getattr(options, "report_split", None)
    if given is None:
        given = file.get("report_split", "test")
    if given is None or str(given).lower() in ("none", "null"):
        return None
    if given == "val":
        raise ValueError(
            "report_split 'val' is the selection split (each run selects its checkpoint on "
            "val); expected 'test', or null to report the selection figure"
        )
    if given not in REPORT_SPLITS:
        raise ValueError(f"report_split {given!r}: expected 'test' or null")
    return str(given)


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
        _baselines(file, options, names, seeds),
        _report_split(file, options),
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
        "report_split": settings.report_split,
        "baseline": settings.baselines or None,
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
