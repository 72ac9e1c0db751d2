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


def page_faults(setup: str = "", **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in allocator.ENVIRONMENT}
    code = STEPS.format(setup=setup)
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True
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
    settings = {name: str(value) for name, (_, value) in allocator.SETTINGS.items()}
    started_with_them = page_faults(**settings)  # what a child of a configured process gets
    assert in_process * 10 < glibc_default and started_with_them * 10 < glibc_default


@pytest.mark.parametrize("given", [None, "65536"])
def test_every_command_sets_the_allocator_unless_the_user_did(
    monkeypatch: pytest.MonkeyPatch, given: str | None
) -> None:
    for name in allocator.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    if given is not None:
        monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", given)
    seen = []
    probe = SimpleNamespace(
        entry=lambda: (
            lambda argv: seen.append({k: os.environ.get(k) for k in allocator.ENVIRONMENT})
        ),
        whole_argv=False,
    )
    monkeypatch.setitem(cli.SUBCOMMANDS, "probe", probe)
    assert cli.main(["probe"]) == 0
    assert seen == [{"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": given or str(1 << 30)}]
