"""How every benchmark ends: PASS or FAIL per goal, one overall line, and an exit status to match.

A benchmark run by a script or CI must fail visibly when it misses a goal, so ``main`` returns the
status of :func:`overall` and the script exits with it: 0 when every goal is met, 1 otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def overall(goals: Mapping[str, bool]) -> int:
    """Prints ``Overall: PASS`` or ``Overall: FAIL (missed: ...)``; returns the exit status."""
    missed = [name for name, ok in goals.items() if not ok]
    print(f"\nOverall: {'FAIL (missed: ' + '; '.join(missed) + ')' if missed else 'PASS'}")
    return 1 if missed else 0
