"""Package-level names that import their module on first use (PEP 562).

``from adaptalign import AlignmentModule`` works, while ``import adaptalign`` (which every
subcommand, ``--help`` included, does first) stays free of torch and Lightning.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(
    package: str, where: Mapping[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, resolving ``name`` from ``where[name]``."""

    def getattr_(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def dir_() -> list[str]:
        return sorted(where)

    return getattr_, dir_
