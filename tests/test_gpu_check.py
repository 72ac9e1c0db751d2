"""``benchmarks/gpu_check.py`` without a GPU: its refusal, its arithmetic, its parsing, and each
part's commands run for real on CPU with a tiny system, so the arguments are known to work."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture()
def check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module, imported as running it from its folder does."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    return importlib.import_module("gpu_check")


def tiny_system(text_model: str) -> list[str]:
    """The quick start shrunk to seconds: the tiny BERT, a 32 px test CNN, 48 training images."""
    return [
        f"--model.text_tower.model_name={text_model}",
        "--model.image_tower.model_name=test_resnet",
        "--model.image_tower.image_size=32",
        "--model.embed_dim=32",
        "--data.generated.num_train=48",
        "--data.generated.num_val=16",
        "--data.generated.num_test=16",
        "--data.generated.image_size=32",
        "--data.batch_size=16",
        "--data.eval_batch_size=16",
    ]


@pytest.mark.slow  # a subprocess that imports torch
def test_no_visible_gpu_is_a_failure_that_says_why() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "no GPU is visible" in done.stderr
    assert "CUDA_VISIBLE_DEVICES is set to ''" in done.stderr
    assert "built with" in done.stderr and "Nothing was checked" in done.stderr
    assert "PASS" not in done.stdout + done.stderr


def test_throughput_from_step_timestamps(check: ModuleType) -> None:
    # [global_step, epoch, seconds]: steps 1-2 warm-up; epoch 0 ends after step 4 (validation).
    steps = [[1, 0, 0.0], [2, 0, 5.0], [3, 0, 5.5], [4, 0, 6.0], [5, 1, 9.0], [6, 1, 9.5]]
    speed = check.throughput(steps, warmup=2, batch_size=64, devices=4)
    assert speed.measured_gaps == 2  # 3->4 and 5->6; not 4->5, which spans the epoch end
    assert speed.steps_per_s == pytest.approx(2 / 1.0)
    assert speed.global_batch == 256
    assert speed.images_per_s == pytest.approx(2.0 * 256)
    assert speed.overall_steps_per_s == pytest.approx(3 / 4.0)  # steps 3 to 6, all included
    with pytest.raises(ValueError, match="too few"):
        check.throughput(steps[:3], warmup=2, batch_size=64, devices=1)
    with pytest.raises(ValueError, match="one epoch"):
        check.throughput([[1, 0, 0.0], [2, 1, 1.0], [3, 2, 2.0]], 0, 64, 1)


COMPARE_OUTPUT = """\
Ray places the runs: 2 at a time, each with 1 CPU + 1 GPU
[1/2] quickstart n=all seed=0 started on 10.0.0.5 GPU 3
[2/2] quickstart n=all seed=1 started on 10.0.0.5 GPU 0
[2/2] quickstart n=all seed=1 done in 41s (i2t R@1 3.2, rsum 80.1); 1 ended, 1 running, 0 waiting
[1/2] quickstart n=all seed=0 FAILED (exit 1) in 40s; trying once more
[1/2] quickstart n=all seed=0 resumed from /o/runs/x/last.ckpt (epoch 0, step 3) on 10.0.0.6 GPU 1
"""


def test_compare_lines_give_each_run_its_gpu(check: ModuleType) -> None:
    starts = check.run_starts(COMPARE_OUTPUT)
    assert starts == {
        "quickstart n=all seed=0": check.Start("10.0.0.6", "1"),  # the last start counts
        "quickstart n=all seed=1": check.Start("10.0.0.5", "0"),
    }
    assert check.placement_verdict(starts, gpus=2) == (True, "the two runs got different GPUs")
    lines = [
        "[1/2] q n=all seed=0 started on 1.2.3.4 GPU 0",
        "[2/2] q n=all seed=1 started on 1.2.3.4 GPU 0",
    ]
    one = check.run_starts("\n".join(lines))
    ok, said = check.placement_verdict(one, gpus=1)
    assert ok and "shared GPU 0 one after another" in said and "was not checked" in said
    ok, said = check.placement_verdict(one, gpus=2)
    assert not ok and "both runs got GPU 0" in said
    cpu = check.run_starts("[1/2] q n=all seed=0 started on 1.2.3.4\n")
    assert cpu == {"q n=all seed=0": check.Start("1.2.3.4", "")}
    assert not check.placement_verdict(cpu, gpus=1)[0]  # one start line, not two


def test_the_gpu_command_layers_the_combined_setting_then_ddp_bf16(check: ModuleType) -> None:
    from tests.helpers.builders import COMBINED_METHODS

    command = check.combined_command(Path("out"), Path("cache"), steps=300)
    layers = [command[i + 1] for i, arg in enumerate(command) if arg == "--config"]
    assert layers == [str(check.QUICKSTART), *COMBINED_METHODS, str(check.DDP_BF16)]
    assert "--trainer.max_steps=300" in command
    assert not any(arg.startswith("--trainer.accelerator") for arg in command)  # ddp_bf16's own
    assert command[-2:] == [
        f"--trainer.callbacks+={check.PROBE}",
        "--trainer.callbacks.output_dir=" + str(Path("out") / "probe"),
    ]


def test_a_failed_part_is_reported_and_the_others_still_run(
    check: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    monkeypatch.setattr(check, "visible_gpus", lambda: 2)
    monkeypatch.setattr(check, "gpu_names", lambda count: ["Test GPU"] * count)
    monkeypatch.setattr(check.torch.cuda, "is_bf16_supported", lambda: True)
    log = tmp_path / "combined.log"
    log.write_text("first\nTraceback: NCCL error\n")

    def broken(*args, **kwargs):
        raise check.PartFailed("adaptalign fit exited with status 1", [log])

    called = []

    def fine(name: str):
        def part(*args, **kwargs):
            called.append(name)
            return check.Report([f"  {name} ran"], [f"{name}: fine"])

        return part

    monkeypatch.setattr(check, "check_combined", broken)
    monkeypatch.setattr(check, "check_retrieval", fine("retrieval"))
    monkeypatch.setattr(check, "check_compare", fine("comparison"))
    assert check.main(["--output", str(tmp_path / "out")]) == 1
    printed = capsys.readouterr().out
    assert called == ["retrieval", "comparison"]
    assert "FAILED: adaptalign fit exited with status 1" in printed
    assert "    Traceback: NCCL error" in printed  # the log's tail
    summary = printed.split("== summary")[1]
    assert "GPUs: 2 x Test GPU" in summary
    assert "retrieval: fine" in summary and "comparison: fine" in summary
    assert "Overall: FAIL (missed: combined methods, DDP + bf16 on 2 GPU(s)" in summary

    monkeypatch.setattr(check, "check_combined", fine("combined"))
    assert check.main(["--output", str(tmp_path / "out")]) == 0
    assert "Overall: PASS" in capsys.readouterr().out


# ----------------------------------------------------------------------------- real, on CPU


ONE_PROCESS = ("--trainer.devices=1", "--trainer.strategy=auto")
TWO_PROCESSES = ("--trainer.devices=2", "--trainer.strategy=ddp")


@pytest.mark.slow
@pytest.mark.parametrize(
    "processes", [ONE_PROCESS, pytest.param(TWO_PROCESSES, marks=pytest.mark.ddp)]
)
def test_the_combined_fit_runs_on_cpu_and_is_timed(
    check: ModuleType, tiny_text_model: str, tmp_path: Path, processes: tuple[str, str]
) -> None:
    """The GPU command with CPU trainer settings: the configs, overrides and probe work, and
    under DDP every rank writes its record and the global batch counts every process."""
    world = 2 if processes == TWO_PROCESSES else 1
    trainer = ["--trainer.accelerator=cpu", *processes, "--trainer.precision=32-true"]
    if world == 1:
        assert trainer == list(check.CPU_TRAINER)
    extra = [
        *tiny_system(tiny_text_model),
        f"--data.generated.num_train={48 * world}",  # 3 steps an epoch
        f"--data.clusters.text_model={tiny_text_model}",
        "--data.clusters.num_clusters=4",
    ]
    report = check.check_combined(
        tmp_path,
        tmp_path / "cache",
        steps=5,
        warmup=1,
        devices=world,
        timeout=600,
        trainer=trainer,
        extra=extra,
    )
    probe = tmp_path / "combined" / "probe"
    records = [json.loads((probe / f"rank{rank}.json").read_text()) for rank in range(world)]
    for record in records:
        assert [step[:2] for step in record["steps"]] == [[1, 0], [2, 0], [3, 0], [4, 1], [5, 1]]
        assert (record["world_size"], record["batch_size"], record["device"]) == (world, 16, "cpu")
    assert f"{world} x cpu:" in report.lines[0]
    assert f"(global batch 16 x {world} = {16 * world}; 2 step gaps" in report.lines[0]
    assert report.summary[0].startswith(f"combined methods ({world} x cpu): ")


@pytest.mark.slow
def test_the_comparison_runs_on_cpu_and_says_where(
    check: ModuleType, tiny_text_model: str, tmp_path: Path
) -> None:
    """The 2-run comparison without GPUs: the command runs and both start lines are read."""
    report = check.check_compare(
        tmp_path,
        tmp_path / "cache",
        gpus=0,
        timeout=600,
        gpus_per_run=0,
        trainer=("--trainer.accelerator=cpu",),
        extra=tiny_system(tiny_text_model),
    )
    assert (
        "quickstart n=all seed=0 -> no GPU, quickstart n=all seed=1 -> no GPU" in (report.lines[0])
    )
    assert (tmp_path / "compare" / "results.csv").is_file()


def test_the_retrieval_part_on_cpu(check: ModuleType) -> None:
    report = check.check_retrieval("cpu", images=40, repeats=1)
    assert report.lines[0].startswith("  40 images x 200 captions on cpu: median ")
    assert "peak memory" not in report.lines[0]  # CUDA only
