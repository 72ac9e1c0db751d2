"""The model settings a checkpoint brings, against the ones the command line was given.

With ``--ckpt_path``, Lightning's command line replaces the parsed ``model`` settings with those
saved in the checkpoint, so ``validate --model.embed_dim 64`` on a 32-dimensional checkpoint runs
at 32 and a resumed ``fit --model.lr 0.5`` keeps the old rate (the restored optimizer state would
undo a new rate anyway). The checkpoint's settings are the only ones its weights can be used with,
so they stay; what changes is that each setting it replaces is named in a warning, before any
model is built.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from jsonargparse import Namespace


def flat(settings: Any, prefix: str = "model") -> dict[str, Any]:
    """Nested settings as ``{"model.image_tower.image_size": 32, ...}``."""
    if isinstance(settings, Namespace):
        settings = settings.as_dict()
    if not isinstance(settings, Mapping):
        return {prefix: settings}
    found: dict[str, Any] = {}
    for key, value in settings.items():
        found |= flat(value, f"{prefix}.{key}")
    return found


def replaced_settings(given: Any, used: Any) -> list[str]:
    """``model.x: given A, the checkpoint has B`` for each setting the checkpoint changed."""
    before, after = flat(given), flat(used)
    return [
        f"{key}: given {before[key]!r}, the checkpoint has {after[key]!r}"
        for key in before
        if key in after and _normal(before[key]) != _normal(after[key])
    ]


def _normal(value: Any) -> Any:
    """Tuples and lists compare equal (a checkpoint stores ``(0.01, 1.0)`` as a list)."""
    return list(value) if isinstance(value, tuple) else value


def warn_replaced_settings(ckpt_path: str, given: Any, used: Any) -> None:
    """Names on stderr every model setting the checkpoint replaced; says nothing if none."""
    lines = replaced_settings(given, used)
    if lines:
        listed = "\n".join(f"  {line}" for line in lines)
        print(
            f"adaptalign: warning: {ckpt_path} was saved with other model settings than the given "
            f"ones; the checkpoint's are used:\n{listed}",
            file=sys.stderr,
        )
