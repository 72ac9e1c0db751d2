"""Wall time of the quick start on this machine, and the retrieval it reaches.

    python benchmarks/bench_quickstart.py [--threads 2]

Runs ``adaptalign fit --config configs/quickstart.yaml`` exactly as the README does, in a scratch
folder with an empty data cache (so generating the dataset is timed too), then reads the last
validation from the run's TensorBoard log. Goal: <= 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from goals import overall, verdict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 300.0
KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")


def run_quickstart(threads: int) -> tuple[float, dict[str, float]]:
    """Seconds the quick start took in a scratch folder, and its last validation's metrics."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {
            **os.environ,
            "ADAPTALIGN_CACHE": str(Path(scratch) / "cache"),
            "OMP_NUM_THREADS": str(threads),
        }
        command = [
            sys.executable,
            "-m",
            "adaptalign",
            "fit",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
        ]
        start = time.perf_counter()
        subprocess.run(
            command,
            cwd=scratch,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - start
        (run,) = Path(scratch, "runs", "quickstart").iterdir()
        events = EventAccumulator(str(run))
        events.Reload()
        return seconds, {k: events.Scalars(f"val/{k}")[-1].value for k in KEYS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    seconds, final = run_quickstart(args.threads)
    print(
        f"quick start wall time: {seconds:.0f} s ({seconds / 60:.1f} min); "
        f"goal <= {GOAL_S:.0f} s: ratio {seconds / GOAL_S:.2f} {verdict(seconds <= GOAL_S)}"
    )
    print("final validation: " + ", ".join(f"{k} {v:.1f}" for k, v in final.items()))
    return overall({f"wall time <= {GOAL_S:.0f} s": seconds <= GOAL_S})


if __name__ == "__main__":
    sys.exit(main())
