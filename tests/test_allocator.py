"""Freed large CPU buffers are reused, not page-faulted in again at every step."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from adaptalign import cli
from adaptalign.common import allocator

# A convolution whose output (20 x 16 x 224 x 224 floats, 64 MiB) is above glibc's largest mmap
# threshold, run once to warm up and then five times: the page faults of those five.
STEPS = """
import resource, torch
{setup}
torch.set_num_threads(1)
image, weight = torch.randn(20, 3, 224, 224), torch.randn(16, 3, 3, 3)
def step():
    torch.nn.functional.conv2d(image, weight, padding=1).relu()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def without_malloc_settings() -> dict[str, str]:
    """This environment less anything that configures glibc's malloc or our switch."""
    return {
        k: v
        for k, v in os.environ.items()
        if not allocator.malloc_configured({k: v}) and k != allocator.SWITCH
    }


def clear_malloc_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's environment without malloc settings or our switch, as a fresh shell has."""
    for name in os.environ.keys() - without_malloc_settings().keys():
        monkeypatch.delenv(name)


def exported() -> dict[str, str | None]:
    """What this process exports of our settings for the processes it starts."""
    return {k: os.environ.get(k) for k in allocator.ENVIRONMENT}


def page_faults(setup: str = "", **env: str) -> int:
    code = STEPS.format(setup=setup)
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**without_malloc_settings(), **env},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.slow
def test_large_buffers_are_reused_in_this_process_and_in_the_processes_it_starts() -> None:
    glibc_default = page_faults()
    # 5 x 16,384 pages of 4 KiB faulted in again (or 5 x 32 where huge pages back the blocks)
    assert glibc_default > 100
    in_process = page_faults(
        "from adaptalign.common.allocator import keep_freed_memory; keep_freed_memory()"
    )
    settings = {name: str(value) for name, (_, value) in allocator.MALLOPT_SETTINGS.items()}
    started_with_them = page_faults(**settings)  # what a child of a configured process gets
    assert in_process * 10 < glibc_default and started_with_them * 10 < glibc_default


OURS = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
UNSET = dict.fromkeys(allocator.ENVIRONMENT)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, OURS),
        # the user's malloc settings, even one of the two, are theirs alone
        ({"MALLOC_TRIM_THRESHOLD_": "65536"}, {**UNSET, "MALLOC_TRIM_THRESHOLD_": "65536"}),
        ({"MALLOC_MMAP_THRESHOLD_": "131072"}, UNSET),
        ({"GLIBC_TUNABLES": "glibc.cpu.x86_shstk=on:glibc.malloc.trim_threshold=0"}, UNSET),
        ({allocator.SWITCH: "0"}, UNSET),
        # settings that do not decide when freed memory goes back
        ({"MALLOC_ARENA_MAX": "2"}, OURS),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, OURS),
    ],
)
def test_every_command_sets_the_allocator_unless_the_user_configured_it(
    monkeypatch: pytest.MonkeyPatch, given: dict[str, str], expected: dict[str, str | None]
) -> None:
    clear_malloc_settings(monkeypatch)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli, "keep_freed_memory", allocator.keep_freed_memory)
    seen = []
    probe = SimpleNamespace(
        entry=lambda: lambda argv: seen.append(exported()),
        whole_argv=False,
    )
    monkeypatch.setitem(cli.SUBCOMMANDS, "probe", probe)
    assert cli.main(["probe"]) == 0
    assert seen == [expected if allocator.glibc_library() is not None else {**UNSET, **given}]


class RecordingLibrary:
    """A C library whose ``mallopt`` records its calls and answers ``result``."""

    def __init__(self, result: int) -> None:
        self.result = result
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return self.result


@pytest.mark.parametrize("result", [1, 0])
def test_only_settings_glibc_accepted_are_exported(
    monkeypatch: pytest.MonkeyPatch, result: int
) -> None:
    clear_malloc_settings(monkeypatch)
    library = RecordingLibrary(result)
    monkeypatch.setattr(allocator, "glibc_library", lambda: library)
    applied = allocator.keep_freed_memory()
    # M_MMAP_MAX (-4) to 0 and M_TRIM_THRESHOLD (-1) to 1 GiB, as malloc.h numbers them
    assert library.calls == [(-4, 0), (-1, 1 << 30)]
    assert (applied, exported()) == ((list(OURS), OURS) if result == 1 else ([], UNSET))


def test_another_c_library_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_malloc_settings(monkeypatch)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.glibc_library() is None
    assert allocator.keep_freed_memory() == []
    assert exported() == UNSET
