"""Every command lets idle OpenMP threads sleep, so runs sharing cores do not starve each other."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from adaptalign import cli


@pytest.mark.parametrize(("given", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_wait_passively_unless_the_user_says_otherwise(
    monkeypatch: pytest.MonkeyPatch, given: str | None, seen: str
) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", given or "restored after the test")
    if given is None:
        monkeypatch.delenv("OMP_WAIT_POLICY")
    policies = []

    def entry(argv: list[str]) -> int:  # where torch (and OpenMP) would be loaded
        policies.append(os.environ.get("OMP_WAIT_POLICY"))
        return 0

    probe = SimpleNamespace(entry=lambda: entry, whole_argv=False)
    monkeypatch.setitem(cli.SUBCOMMANDS, "probe", probe)
    assert cli.main(["probe"]) == 0
    assert policies == [seen]
