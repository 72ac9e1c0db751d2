"""Progress of long one-time work (generating data, extracting features, encoding captions).

On a terminal it is a tqdm bar. Anywhere else (a log file, a pipe, a notebook cell, a CI job) a
bar redrawn with carriage returns shows nothing until it ends, or one line of control characters,
so there it is plain lines: one every ``LINE_INTERVAL`` seconds and one when the work ends. Both
go to stderr, beside the warnings and Lightning's own messages; callers first :func:`say` what the
work is.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Protocol

from tqdm import tqdm

# Seconds between two progress lines when the output is not a terminal: a 10-minute extraction
# writes about 20 lines.
LINE_INTERVAL = 30.0


class Bar(Protocol):
    """What callers use of a progress report: count finished items, and end it."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...

    def __enter__(self) -> Bar: ...

    def __exit__(self, *args: object) -> None: ...


def say(text: str, stream: IO[str] | None = None) -> None:
    """One line about what is happening, where progress goes (stderr, flushed at once)."""
    print(text, file=stream or sys.stderr, flush=True)


class ProgressLines:
    """Progress as whole lines: ``text features: 2048/12500 captions (16%), 00:14 elapsed, ...``.

    ``clock`` is replaceable so tests do not depend on timing.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        stream: IO[str],
        interval: float = LINE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.interval, self.clock = interval, clock
        self.done = 0
        self.started = self.last = clock()
        self.closed = False

    def line(self) -> str:
        elapsed = self.clock() - self.started
        text = f"{self.desc}: {self.done}/{self.total} {self.unit}s"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {tqdm.format_interval(elapsed)} elapsed"
        if 0 < self.done < self.total:
            left = elapsed * (self.total - self.done) / self.done
            text += f", about {tqdm.format_interval(left)} left"
        return text

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            say(self.line(), self.stream)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            say(self.line(), self.stream)

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()


def progress_bar(
    total: int, desc: str, unit: str, enabled: bool = True, stream: IO[str] | None = None
) -> Bar:
    """A tqdm bar on a terminal, :class:`ProgressLines` elsewhere, nothing when not ``enabled``."""
    stream = stream or sys.stderr
    if not enabled:
        return tqdm(total=total, disable=True)
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=stream, mininterval=0.5)
    return ProgressLines(total, desc, unit, stream)
