"""What a tuning study is: its file, checked whole before any trial runs.

A tuning file names the base config (layered like a comparison's), a search space per
hyperparameter, a trial budget, the metric and the seeds each trial trains::

    base: [configs/flickr8k/base.yaml, configs/flickr8k/fixed_temperature.yaml]
    space:
      model.temperature: {loguniform: [0.01, 0.2]}
      model.lr: {loguniform: [1.0e-4, 1.0e-2]}
      methods.tonics.schedule: {choice: [ramp, step]}
      methods.arl.warmup_epochs: {int: [0, 5]}      # both ends included
      methods.arl.gamma: {uniform: [0.5, 6.0]}
    trials: 16
    metric: val/rsum          # the default; mode: max
    seeds: [0]                # each trial's score: the mean over these of each run's best epoch
    train_images: 1000
    output: tuning/baseline
    early_stopping: {grace_period: 4, reduction_factor: 3}   # ASHA; null: every trial runs out
    sampler_seed: 0           # TPE's own seed: the same file gives the same study
    overrides: [--trainer.enable_progress_bar=false]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adaptalign.common.checks import is_int, is_number
from adaptalign.common.errors import ConfigurationError
from adaptalign.experiments.compare_settings import config_entry, parse_train_images

KINDS = ("uniform", "loguniform", "int", "choice")
KEYS = (
    "base",
    "space",
    "trials",
    "metric",
    "mode",
    "seeds",
    "train_images",
    "output",
    "early_stopping",
    "sampler_seed",
    "overrides",
)


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter: a ``fit`` key (``model.lr``) and where its values come from."""

    key: str
    kind: str
    values: tuple  # (low, high) for ranges, the options for a choice

    def sample_value(self) -> Any:
        """A value the fit must accept, to check the key before the study starts."""
        return self.values[0]

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "int":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's high is exclusive
        return tune.choice(list(self.values))


@dataclass(frozen=True)
class EarlyStopping:
    """ASHA's settings: no trial is stopped before ``grace_period`` validations."""

    grace_period: int = 4
    reduction_factor: int = 3


@dataclass(frozen=True)
class Study:
    """One tuning study, as its file says (and the command line overrides)."""

    path: Path
    base: str  # layered configs joined by "+", as a comparison's
    space: tuple[Dimension, ...]
    trials: int
    output: Path
    metric: str = "val/rsum"
    mode: str = "max"
    seeds: tuple[int, ...] = (0,)
    train_images: int | float | None = None
    early_stopping: EarlyStopping | None = EarlyStopping()
    sampler_seed: int = 0
    overrides: tuple[str, ...] = field(default_factory=tuple)

    def fit_arguments(self, config: dict[str, Any]) -> list[str]:
        """The ``fit`` arguments a trial's setting adds: one ``--key=value`` per hyperparameter."""
        return [f"--{key}={cli_value(value)}" for key, value in config.items()]


def plain(value: Any) -> Any:
    """A Python scalar for a NumPy one (what samplers hand out), as YAML and JSON write it."""
    return value.item() if hasattr(value, "item") else value


def cli_value(value: Any) -> str:
    value = plain(value)
    return value if isinstance(value, str) else json.dumps(value)


def fail(path: Path, message: str) -> ConfigurationError:
    return ConfigurationError(f"{path}: {message}")


def dimension(path: Path, key: str, spec: Any) -> Dimension:
    """``{kind: [low, high]}`` or ``{choice: [a, b, ...]}``, checked."""
    where = f"space: {key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise fail(path, f"{where}: expected one of {{{', '.join(KINDS)}}}: [...], got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        raise fail(path, f"{where}: unknown distribution {kind!r}; expected one of {KINDS}")
    if not isinstance(values, list) or not values:
        raise fail(path, f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind == "choice":
        if len(values) < 2:
            raise fail(path, f"{where}: a choice needs at least 2 options, got {values}")
        return Dimension(key, kind, tuple(values))
    if len(values) != 2 or not all(is_number(v) for v in values):
        raise fail(path, f"{where}: {kind} needs [low, high] numbers, got {values}")
    low, high = values
    if kind == "int" and not (is_int(low) and is_int(high)):
        raise fail(path, f"{where}: int needs integer ends, got {values}")
    if not low < high:
        raise fail(path, f"{where}: empty range [{low}, {high}]; expected low < high")
    if kind == "loguniform" and not low > 0:
        raise fail(path, f"{where}: loguniform needs low > 0, got {low}")
    if not all(math.isfinite(float(v)) for v in values):
        raise fail(path, f"{where}: expected finite ends, got {values}")
    return Dimension(key, kind, (low, high))


def read_study(
    path: Path,
    output: str | None = None,
    trials: int | None = None,
    train_images: str | None = None,
) -> Study:
    """The tuning file, checked; ``output``, ``trials`` and ``train_images`` from the command
    line win (one study file then serves several training-set sizes)."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"{path}: cannot read the tuning file ({exc})") from exc
    if not isinstance(document, dict):
        raise fail(path, "expected a mapping with base, space and trials")
    unknown = sorted(set(document) - set(KEYS))
    if unknown:
        raise fail(path, f"unknown key(s) {unknown}; expected some of {KEYS}")
    if "base" not in document:
        raise fail(path, "no base config; expected base: CONFIG.yaml or a list of layers")
    base = config_entry(document["base"])
    space = document.get("space")
    if not isinstance(space, dict) or not space:
        raise fail(path, "no search space; expected space: {KEY: {KIND: [...]}, ...}")
    dimensions = tuple(dimension(path, str(key), spec) for key, spec in space.items())
    budget = trials if trials is not None else document.get("trials")
    if budget is None:
        raise fail(path, "no trial budget; expected trials: N (an integer >= 1)")
    if not is_int(budget) or budget < 1:
        raise fail(path, f"trials: {budget!r}; expected an integer >= 1")
    mode = document.get("mode", "max")
    if mode not in ("max", "min"):
        raise fail(path, f"mode: {mode!r}; expected max or min")
    seeds = document.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds or not all(is_int(s) and s >= 0 for s in seeds) or len(set(seeds)) < len(seeds):
        raise fail(path, f"seeds: {seeds!r}; expected distinct integers >= 0")
    folder = output if output is not None else document.get("output")
    if folder is None:
        raise fail(path, "no output folder; expected output: DIR (or --output DIR)")
    try:
        size = parse_train_images(
            train_images if train_images is not None else document.get("train_images")
        )
    except (ValueError, argparse.ArgumentTypeError) as exc:
        where = "--train-images" if train_images is not None else "train_images"
        raise fail(path, f"{where}: {exc}") from exc
    overrides = document.get("overrides", [])
    overrides = overrides if isinstance(overrides, list) else [overrides]
    sampler_seed = document.get("sampler_seed", 0)
    if not is_int(sampler_seed):
        raise fail(path, f"sampler_seed: {sampler_seed!r}; expected an integer")
    return Study(
        path=path,
        base=base,
        space=dimensions,
        trials=int(budget),
        output=Path(str(folder)),
        metric=str(document.get("metric", "val/rsum")),
        mode=mode,
        seeds=tuple(int(s) for s in seeds),
        train_images=size,
        early_stopping=early_stopping(path, document.get("early_stopping", {})),
        sampler_seed=int(sampler_seed),
        overrides=tuple(str(o) for o in overrides),
    )


def early_stopping(path: Path, value: Any) -> EarlyStopping | None:
    if value is None or value is False:
        return None
    if not isinstance(value, dict) or set(value) - {"grace_period", "reduction_factor"}:
        raise fail(path, f"early_stopping: {value!r}; expected {{grace_period, reduction_factor}}")
    settings = EarlyStopping(**value)
    if not (is_int(settings.grace_period) and settings.grace_period >= 1):
        raise fail(path, f"early_stopping.grace_period: expected >= 1, got {settings.grace_period}")
    if not (is_int(settings.reduction_factor) and settings.reduction_factor >= 2):
        raise fail(path, "early_stopping.reduction_factor: expected an integer >= 2")
    return settings


def overlay(config: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as the nested mapping a config layer is (``model.lr`` -> model: {lr: ...})."""
    tree: dict[str, Any] = {}
    for key, value in config.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = plain(value)
    return tree


def keys_of(dimensions: Sequence[Dimension]) -> list[str]:
    return [d.key for d in dimensions]
