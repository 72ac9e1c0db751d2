"""Type checks for settings and file values, shared so every error accepts and refuses alike.

``bool`` is an ``int`` to Python, but ``true`` where a count is expected is a mistake in a config
or a file, so these refuse it. NumPy scalars pass: values computed with NumPy are settings too.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def is_int(value: object) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number (int or float, Python or NumPy), not a bool; NaN and infinities pass."""
    return isinstance(value, Real) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """A real number that is neither NaN nor infinite, not a bool."""
    return is_number(value) and math.isfinite(value)  # type: ignore[arg-type]
