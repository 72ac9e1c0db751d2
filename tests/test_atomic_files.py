"""Whole-or-nothing writes, and the cleanup of what killed writers leave behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adaptalign.common import atomic_files
from adaptalign.common.atomic_files import (
    atomic_open,
    atomic_save,
    remove_leftovers,
    temporary_path,
)

# A writer at work: creates its temporary file the way atomic_open does and holds it locked.
LOCKED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from adaptalign.common.atomic_files import _open_locked
    path, file = _open_locked(Path(sys.argv[1]), "wb")
    print(path, flush=True)
    sys.stdin.read()  # until the test closes its end
    """
)


def test_a_write_replaces_the_target_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "deeper" / "summary.json"
    atomic_save(target, "first\n")
    atomic_save(target, "second\n")
    assert target.read_text() == "second\n"
    with atomic_open(target.with_name("weights.bin")) as file:
        file.write(b"\x00\x01")
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json", "weights.bin"]
    assert (target.parent / "weights.bin").read_bytes() == b"\x00\x01"


def test_an_error_keeps_the_previous_content(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    atomic_save(target, b"good")
    with pytest.raises(OSError, match="disk gone"), atomic_open(target) as file:
        file.write(b"half")
        raise OSError("disk gone")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    with pytest.raises(ValueError, match="mode='a'"), atomic_open(target, "a"):
        pass


def test_leftovers_of_dead_writers_go_and_those_of_live_ones_stay(tmp_path: Path) -> None:
    """The next write in a folder deletes every unlocked temporary file, of any target."""
    dead = [temporary_path(tmp_path / name) for name in ("last.ckpt", "best-epoch=3.ckpt")]
    for path in dead:
        path.write_bytes(b"half a checkpoint")  # nobody holds its lock: its writer was killed
    unrelated = tmp_path / ".notes.tmp"  # not a name atomic_open makes: never touched
    unrelated.write_text("mine")
    live = subprocess.Popen(
        [sys.executable, "-c", LOCKED_WRITER, str(tmp_path / "last.ckpt")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        in_progress = Path(live.stdout.readline().strip())
        assert in_progress.parent == tmp_path and in_progress.exists()
        atomic_save(tmp_path / "last.ckpt", b"complete")
        kept = sorted(p.name for p in tmp_path.iterdir())
        assert kept == sorted(["last.ckpt", unrelated.name, in_progress.name])
    finally:
        live.stdin.close()
        live.wait(timeout=30)
    # its writer gone (without cleaning up), the file is a leftover like the others
    assert remove_leftovers(tmp_path) == [in_progress]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", unrelated.name])


def test_a_file_deleted_before_its_writer_locks_it_is_replaced_by_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cleaner may take the lock between creating and locking: the writer must notice."""
    real_lock = atomic_files._try_lock
    names: list[str] = []

    def cleaner_first(file, blocking: bool) -> bool:
        names.append(file.name)
        if len(names) == 1:
            Path(file.name).unlink()  # what a cleaner holding the lock at that moment does
        return real_lock(file, blocking)

    monkeypatch.setattr(atomic_files, "_try_lock", cleaner_first)
    atomic_save(tmp_path / "last.ckpt", b"complete")
    assert (tmp_path / "last.ckpt").read_bytes() == b"complete"
    assert len(names) == 2 and names[0] != names[1]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
