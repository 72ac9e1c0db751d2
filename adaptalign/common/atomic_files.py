"""Files written whole or not at all, and the leftovers of writers that were killed.

A file is written to a hidden temporary name in its own folder, flushed to disk and renamed over
its target, so the target always holds either the previous content or the new one, complete:
a run killed mid-write (out of memory, a pre-empted job, a SIGKILL) never leaves a truncated
checkpoint, summary or cache entry behind. What it does leave is its temporary file, which can be
as large as a checkpoint. While a writer is at work it holds an exclusive ``flock`` on its file;
the lock dies with the process, so every complete write deletes the temporary files in its folder
whose lock it can take. Unlike a process id, the lock cannot be mistaken across containers
sharing a folder or after the id is reused by a restarted job. Without ``flock`` (outside POSIX)
leftovers are kept.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, so no safe way to tell a leftover
    fcntl = None  # type: ignore[assignment]

# ".<target name>.<pid>.<8 hex>.tmp": never ends in the target's suffix, so nothing that looks
# for checkpoints (``*.ckpt``) or summaries can mistake a half-written file for one.
TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")


def temporary_path(target: Path) -> Path:
    """A unique hidden name beside ``target`` (the process id only helps a person reading it)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _try_lock(file: IO, blocking: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _open_locked(target: Path, mode: str) -> tuple[Path, IO]:
    """A new temporary file, locked, and still at its name once the lock is held.

    Between creating the file and locking it, a cleaner may have taken the lock and deleted it;
    then another name is tried.
    """
    while True:
        path = temporary_path(target)
        binary = "b" in mode
        file = open(path, "xb" if binary else "x", encoding=None if binary else "utf-8")  # noqa: SIM115
        _try_lock(file, blocking=True)
        try:
            if os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
                return path, file
        except FileNotFoundError:
            pass
        file.close()


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; folders cannot be opened for this outside POSIX."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files in ``folder`` whose writers are gone; returns what it deleted.

    A file whose lock is held belongs to a writer at work (in this process or another) and is
    kept. A failure to delete is not an error: it never undoes the write that triggered it.
    """
    if fcntl is None:
        return []
    removed = []
    for path in folder.iterdir():
        if not TEMPORARY.match(path.name):
            continue
        try:
            with open(path, "rb") as file:
                if _try_lock(file, blocking=False):
                    path.unlink()  # while locked, so no writer can take it over meanwhile
                    removed.append(path)
        except OSError:  # gone already, or not ours to delete
            continue
    return removed


@contextmanager
def atomic_open(target: str | Path, mode: str = "wb") -> Iterator[IO]:
    """An open temporary file that becomes ``target`` when the block ends without an error.

    On an error the temporary file is deleted and ``target`` keeps its previous content.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}; expected 'w' or 'wb'")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary, file = _open_locked(target, mode)
    try:
        with file:
            yield file
            file.flush()
            os.fsync(file.fileno())
            os.replace(temporary, target)  # before the lock goes with the close
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
    remove_leftovers(target.parent)


def atomic_save(target: str | Path, data: str | bytes) -> None:
    """``target`` gets ``data`` whole; readers never see a half-written file."""
    with atomic_open(target, "w" if isinstance(data, str) else "wb") as file:
        file.write(data)


@contextmanager
def exclusive(lock_path: str | Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Runs the block in one process at a time, by an exclusive ``flock`` on ``lock_path``.

    For work that several processes would otherwise do side by side, such as two runs of a
    comparison filling the same cache: the second waits and then finds the work done. The lock
    dies with its holder, so a killed process never leaves the next one waiting. ``on_wait`` is
    called once when another process holds the lock. Without ``flock`` the block runs unguarded.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as file:  # the lock goes with the close
        if not _try_lock(file, blocking=False):
            if on_wait is not None:
                on_wait()
            _try_lock(file, blocking=True)
        yield
