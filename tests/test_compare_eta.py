"""The comparison's remaining-time estimate leaves out the first runs' one-time preparation."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptalign.experiments.compare_runs import Progress, Run, remaining_seconds


def test_the_first_round_is_left_out_and_later_runs_give_the_median() -> None:
    # One job: the first run extracted features for 600 s, the others take 20-40 s.
    assert remaining_seconds([600.0], remaining=11, jobs=1) is None
    assert remaining_seconds([600.0, 20.0], remaining=10, jobs=1) == 10 * 20.0
    assert remaining_seconds([600.0, 20.0, 40.0], remaining=9, jobs=1) == 9 * 30.0
    # A later run that added a few missing features does not pull the median up.
    assert remaining_seconds([600.0, 20.0, 200.0, 22.0], remaining=8, jobs=1) == 8 * 22.0
    # Two jobs: the first two runs prepared data side by side; 5 runs left are 3 rounds.
    assert remaining_seconds([610.0, 600.0], remaining=5, jobs=2) is None
    assert remaining_seconds([610.0, 600.0, 30.0], remaining=5, jobs=2) == 3 * 30.0
    assert remaining_seconds([600.0, 20.0], remaining=0, jobs=1) is None


def test_progress_lines_say_the_estimate(capsys: pytest.CaptureFixture) -> None:
    progress = Progress(total=12, to_run=12, slots=1)
    run = Run("fixed", "base.yaml", 1000, 0, Path("runs/fixed"))
    assert progress.eta(600.0).startswith("; no ETA yet: the first runs also prepare data")
    assert progress.eta(20.0) == "; ETA 3m 20s"  # 10 runs left at 20 s each
    assert progress.eta(40.0) == "; ETA 4m 30s"  # 9 at the median, 30 s
    progress.say(2, run, "done")
    assert capsys.readouterr().out == "[3/12] fixed n=1000 seed=0 done\n"
    progress.running = 2  # 3 ended, 2 running: 7 of the 12 still wait
    assert progress.counts() == "3 ended, 2 running, 7 waiting"
