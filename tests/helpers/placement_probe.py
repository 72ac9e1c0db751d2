"""Work for the placement tests: records the devices a worker sees and how many ran at once.

Each call leaves ``NAME.start`` (its ``CUDA_VISIBLE_DEVICES``), ``NAME.met`` and ``NAME.end``
in a shared folder. It waits until ``together`` calls have started (or one has ended: then it was
not meant to run alongside the first ones) and notes how many run, then ends only once ``together``
calls have noted it, so calls that can run at once provably do, and each sees the others.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path


def probe(folder: str, name: str, together: int) -> dict:
    place = Path(folder)
    started = [p.stem for p in place.glob("*.start")]
    ended = [p.stem for p in place.glob("*.end")]
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    (place / f"{name}.start").write_text(json.dumps(devices))
    wait_for(lambda: count(place, "start") >= together or count(place, "end") > 0)
    running = count(place, "start") - count(place, "end")
    (place / f"{name}.met").write_text("")
    wait_for(lambda: count(place, "met") >= together)
    (place / f"{name}.end").write_text("")
    return {
        "devices": devices,
        "started_before": sorted(started),
        "ended_before": sorted(ended),
        "running": running,
    }


def count(place: Path, kind: str) -> int:
    return len(list(place.glob(f"*.{kind}")))


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 120.0  # a safety net against a hang, not a measurement
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def die_once(folder: str, name: str) -> str:
    """Kills its own process the first time (a pre-empted machine), returns the second time."""
    marker = Path(folder) / f"{name}.died"
    if not marker.exists():
        marker.write_text("")
        os.kill(os.getpid(), 9)
    return name
