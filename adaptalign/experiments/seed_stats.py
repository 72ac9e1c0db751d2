"""Spread over seeds: a mean, its sample standard deviation and its Student-t interval.

One implementation for every figure over seeds, a config's mean metric and the mean of paired
differences alike, so each interval is computed the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stat:
    """Mean over seeds, sample standard deviation (ddof=1) and the 95% t-interval half-width."""

    mean: float
    std: float | None
    half_width: float | None
    n: int

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.half_width is None:
            return None
        return (self.mean - self.half_width, self.mean + self.half_width)


def describe(values: Sequence[float], confidence: float = 0.95) -> Stat:
    """Spread over seeds; a single value has no standard deviation and no interval."""
    from scipy import stats  # only reports need scipy

    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return Stat(mean, None, None, n)
    std = float(np.std(values, ddof=1))
    quantile = float(stats.t.ppf((1 + confidence) / 2, df=n - 1))
    return Stat(mean, std, quantile * std / math.sqrt(n), n)
