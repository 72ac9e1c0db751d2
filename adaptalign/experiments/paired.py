"""Paired statistics over seeds: each config against the comparison's baseline, seed by seed.

A seed fixes a run's training subset, its initialisation and its batch order, whatever the method
(the subset is drawn from the seed alone), so two configs run with the same seed differ only by the
method. The differences ``config - baseline`` of matching seeds remove the seed-to-seed spread both
share, which an unpaired comparison of two means with their own intervals cannot: a difference of
2 rsum can be certain when every seed shows it and lost in a spread of 4. Pure functions from rows
to numbers and text, so every figure can be checked by hand.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adaptalign.experiments.seed_stats import describe
from adaptalign.lightning_modules.metric_names import RSUM

MIN_SEEDS = 2  # one paired difference has no spread, hence no interval and no test


@dataclass(frozen=True)
class Paired:
    """``config - baseline`` of one metric over the seeds both ran, and what they say.

    ``half_width`` is that of the two-sided Student-t interval of the mean difference at
    ``confidence``; ``p_value`` that of the paired t-test (the one-sample t-test of the
    differences against 0). Both are ``None`` with a single pair.
    """

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    half_width: float | None
    p_value: float | None

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.half_width is None:
            return None
        return (self.mean - self.half_width, self.mean + self.half_width)

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below 0: a difference the seeds support."""
        interval = self.interval
        return interval is not None and (interval[0] > 0 or interval[1] < 0)


def paired_difference(
    seeds: Sequence[int],
    values: Sequence[float],
    baseline: Sequence[float],
    confidence: float = 0.95,
) -> Paired:
    """The mean of ``values[i] - baseline[i]``, its t-interval (:func:`describe`, as for any mean
    over seeds) and the paired t-test's p-value.

    Identical differences have no spread: the interval is the point itself and the test's p-value
    is 0 (every seed moved by the same non-zero amount) or 1 (no seed moved).
    """
    from scipy import stats  # only reports need scipy

    if not len(seeds) == len(values) == len(baseline):
        raise ValueError(f"{len(seeds)} seeds, {len(values)} values, {len(baseline)} baselines")
    if not seeds:
        raise ValueError("no seeds to pair")
    differences = tuple(float(v) - float(b) for v, b in zip(values, baseline, strict=True))
    spread = describe(differences, confidence)
    if spread.std is None:
        p_value = None
    elif spread.std == 0:
        p_value = 0.0 if spread.mean != 0 else 1.0
    else:
        p_value = float(stats.ttest_1samp(differences, 0.0).pvalue)
    return Paired(tuple(seeds), differences, spread.mean, spread.half_width, p_value)


def paired_groups(
    rows: Sequence[dict[str, Any]], baseline: str, metric: str = RSUM
) -> list[dict[str, Any]]:
    """Every other config against ``baseline``, per training size, on the seeds both finished.

    Returns one entry per (config, size) in first-seen order: ``name``, ``train_images``,
    ``paired`` (:class:`Paired`, ``None`` when no seed matches) and ``unpaired`` (the seeds one
    side finished and the other did not, left out of the statistics).
    """
    by_key: dict[tuple[str, str], dict[int, float]] = {}
    for row in rows:
        value = row.get(metric)
        if value in (None, ""):
            continue
        key = (str(row["name"]), str(row["train_images"]))
        by_key.setdefault(key, {})[int(row["seed"])] = float(value)
    result = []
    for (name, size), values in by_key.items():
        if name == baseline:
            continue
        base = by_key.get((baseline, size), {})
        seeds = sorted(set(values) & set(base))
        unpaired = sorted(set(values) ^ set(base))
        paired = (
            paired_difference(seeds, [values[s] for s in seeds], [base[s] for s in seeds])
            if seeds
            else None
        )
        result.append({"name": name, "train_images": size, "paired": paired, "unpaired": unpaired})
    return result


def signed(value: float, digits: int = 1) -> str:
    return f"{value:+.{digits}f}"


def format_p(p_value: float | None) -> str:
    if p_value is None:
        return "-"
    return "< 0.001" if p_value < 0.001 else f"{p_value:.3f}"


def paired_table(groups: Sequence[dict[str, Any]], digits: int = 1) -> str:
    """One row per (config, size): mean difference (bold when its interval excludes 0), the
    interval, the p-value, each seed's difference and the seeds left unpaired."""
    header = [
        "config",
        "train images",
        "pairs",
        "difference",
        "95% CI",
        "p (paired t)",
        "per seed",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for group in groups:
        paired: Paired | None = group["paired"]
        cells = [group["name"], group["train_images"]]
        if paired is None:
            cells += ["0", "-", "-", "-", "no seed in common"]
        else:
            mean = signed(paired.mean, digits)
            interval = paired.interval
            per_seed = ", ".join(
                f"{s}: {signed(d, digits)}"
                for s, d in zip(paired.seeds, paired.differences, strict=True)
            )
            cells += [
                str(len(paired.seeds)),
                f"**{mean}**" if paired.excludes_zero else mean,
                "-"
                if interval is None
                else f"[{signed(interval[0], digits)}, {signed(interval[1], digits)}]",
                format_p(paired.p_value),
                per_seed,
            ]
        if group["unpaired"]:
            cells[-1] += f" (unpaired: seed {', '.join(str(s) for s in group['unpaired'])})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_intro(baseline: str, metric: str = RSUM) -> str:
    """What the paired table shows."""
    return (
        f"Paired differences in {metric} against `{baseline}`: for each seed (the same training "
        f"subset, initialisation and batch order for every config) the config's {metric} minus "
        f"`{baseline}`'s, then their mean, its 95% Student-t interval and the paired t-test's "
        "p-value. A difference is **bold** when its interval excludes 0."
    )


PAIRED_FIELDS = ("name", "train_images", "baseline", "seed", "difference")


def paired_csv(sections: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> str:
    """Each seed's difference against each baseline as CSV, to recompute the statistics
    elsewhere; ``sections`` as :func:`paired_sections` gives them."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PAIRED_FIELDS, lineterminator="\n")
    writer.writeheader()
    for baseline, groups in sections:
        for group in groups:
            paired: Paired | None = group["paired"]
            if paired is None:
                continue
            for seed, difference in zip(paired.seeds, paired.differences, strict=True):
                writer.writerow(
                    {
                        "name": group["name"],
                        "train_images": group["train_images"],
                        "baseline": baseline,
                        "seed": seed,
                        "difference": round(difference, 6),
                    }
                )
    return buffer.getvalue()


def shown_groups(rows: Sequence[dict[str, Any]], baseline: str | None) -> list[dict[str, Any]]:
    """The paired groups worth a table: none without a baseline or without 2 matched seeds."""
    if baseline is None:
        return []
    groups = paired_groups(rows, baseline)
    if not any(g["paired"] is not None and len(g["paired"].seeds) >= MIN_SEEDS for g in groups):
        return []
    return groups


def paired_sections(
    rows: Sequence[dict[str, Any]], baselines: Sequence[str]
) -> list[tuple[str, list[dict[str, Any]]]]:
    """(baseline, its paired groups) for every baseline with something to show, in order."""
    return [(b, groups) for b in baselines if (groups := shown_groups(rows, b))]


def paired_text(sections: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> str:
    """Each baseline's introduction and table, one after the other ("" when there is none)."""
    return "\n".join(f"{paired_intro(b)}\n\n{paired_table(groups)}" for b, groups in sections)
