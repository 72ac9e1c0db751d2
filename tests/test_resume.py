"""A run killed mid-epoch resumes exactly; checkpoints are never left half-written."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import Dataset

from adaptalign.cli import main
from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.curriculum_sampler import CurriculumBatchSampler
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.datasets import PairSampler
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.datamodules.resumable import ResumableDataLoader
from adaptalign.lightning_cli.cli import build_cli, with_atomic_checkpoints
from adaptalign.lightning_modules import rng
from adaptalign.lightning_modules.checkpoint_io import AtomicCheckpointIO
from tests.helpers.builders import COMBINED_METHODS, final_validation, tiny_module
from tests.helpers.distributed import run_distributed
from tests.helpers.rng_ranks import gather_work

ROOT = Path(__file__).parents[1]
TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


# ----------------------------------------------------------------------- the loader
class Keys(Dataset):
    """Items are the keys asked for; counts every load, so skipped samples show up."""

    def __init__(self, size: int = 24) -> None:
        self.size = size
        self.loaded = 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        self.loaded += 1
        return key


def pair_loader(dataset: Keys, epoch: int = 0, **kwargs: object) -> ResumableDataLoader:
    """The random path's loader: a ``PairSampler`` batched by the DataLoader itself."""
    sampler = PairSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
    sampler.set_epoch(epoch)
    return ResumableDataLoader(
        dataset, batch_size=4, sampler=sampler, drop_last=True, collate_fn=list, **kwargs
    )


def curriculum_loader(dataset: Keys, epoch: int = 0) -> ResumableDataLoader:
    tags = [(f"shape{i % 5}",) if i % 7 else () for i in range(len(dataset))]
    sampler = CurriculumBatchSampler(tags, 4, seed=3, same_object_share=0.5, epoch=epoch)
    return ResumableDataLoader(dataset, batch_sampler=sampler, collate_fn=list)


@pytest.mark.parametrize("make", [pair_loader, curriculum_loader], ids=["pairs", "curriculum"])
def test_a_restored_loader_skips_exactly_the_batches_trained_on(make) -> None:
    full = list(make(Keys(), epoch=2))
    assert len(full) == 6 and len({tuple(b) for b in full}) == 6

    interrupted = make(Keys(), epoch=2)
    iterator = iter(interrupted)
    trained = [next(iterator), next(iterator)]
    assert trained == full[:2]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches": 2}

    dataset = Keys()
    resumed = make(dataset, epoch=2)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # saved again before it went on: same position
    rest = list(resumed)
    assert rest == full[2:]
    assert dataset.loaded == 4 * 4  # the two skipped batches were never loaded
    assert resumed.state_dict() == {"epoch": 2, "batches": 6}
    assert list(resumed) == full  # the state applied to one iteration only


@pytest.mark.parametrize("make", [pair_loader, curriculum_loader], ids=["pairs", "curriculum"])
def test_a_state_only_applies_to_its_own_epoch(make) -> None:
    """A checkpoint from the end of epoch 2 resumes at epoch 3, whose batches are all new."""
    loader = make(Keys(), epoch=3)
    loader.load_state_dict({"epoch": 2, "batches": 6})
    assert list(loader) == list(make(Keys(), epoch=3))
    assert loader.state_dict() == {"epoch": 3, "batches": 6}


def test_the_epoch_is_read_when_the_first_batch_is_drawn_also_with_workers() -> None:
    """Lightning creates the iterator before setting a resumed epoch; a worker must not draw yet."""
    expected = list(pair_loader(Keys(), epoch=1))
    loader = pair_loader(Keys(), num_workers=1, persistent_workers=True)  # sampler at epoch 0
    loader.load_state_dict({"epoch": 1, "batches": 4})
    iterator = iter(loader)
    loader.sampler.set_epoch(1)
    assert list(iterator) == expected[4:]
    assert loader.state_dict() == {"epoch": 1, "batches": 6}
    loader.sampler.set_epoch(2)  # the next epoch, on the same (persistent) worker
    assert list(loader) == list(pair_loader(Keys(), epoch=2))


def test_the_epoch_source_decides_which_epoch_an_iteration_is() -> None:
    epoch = {"now": 5}
    loader = pair_loader(Keys(), epoch=0, epoch_source=lambda: epoch["now"])
    loader.load_state_dict({"epoch": 5, "batches": 5})
    assert len(list(loader)) == 1 and loader.state_dict() == {"epoch": 5, "batches": 6}


@pytest.mark.slow
@pytest.mark.parametrize(
    "state", [{"epoch": -1, "batches": 0}, {"epoch": 1}, {"epoch": 1, "batches": "2"}]
)
def test_a_malformed_state_is_refused(state: dict) -> None:
    with pytest.raises(ConfigurationError, match="training loader state"):
        pair_loader(Keys()).load_state_dict(state)


@pytest.mark.slow
def test_the_data_module_carries_the_loader_position(tmp_path: Path) -> None:
    """What Lightning stores for the data module puts a new one's loader at the same batch."""

    def data() -> AlignmentDataModule:
        module = AlignmentDataModule(
            generated=GeneratedConfig(num_train=32, num_val=8, num_test=8, image_size=32),
            cache_dir=str(tmp_path),
            batch_size=8,
        )
        module.setup()
        return module

    first = data()
    assert first.state_dict() == {}
    batches = iter(first.train_dataloader())
    next(batches)
    state = first.state_dict()
    assert state == {"train_loader": {"epoch": 0, "batches": 1}}
    second = data()
    second.load_state_dict(state)  # before its loader exists, as Lightning restores it
    rest = [b["image_id"].tolist() for b in second.train_dataloader()]
    assert rest == [b["image_id"].tolist() for b in batches]
    assert len(rest) == 3


# ------------------------------------------------------------------- checkpoint files
def test_atomic_checkpoints_load_and_leave_nothing_else(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "deeper" / "last.ckpt"
    io.save_checkpoint({"weights": torch.arange(4), "step": 3}, target)
    loaded = io.load_checkpoint(target)
    assert loaded["step"] == 3 and torch.equal(loaded["weights"], torch.arange(4))
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, target, storage_options={"x": 1})


def test_a_write_that_dies_halfway_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, target)
    before = target.read_bytes()
    real_save = torch.save

    def dies_halfway(obj, file, *args, **kwargs) -> None:
        real_save(obj, file, *args, **kwargs)
        file.truncate(file.tell() // 2)
        raise OSError("disk gone")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk gone"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, target)
    assert target.read_bytes() == before
    assert io.load_checkpoint(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_the_command_line_writes_atomically_whatever_plugins_are_given(
    tiny_text_model: str, tmp_path: Path
) -> None:
    args = ["--config", TINY, f"--model.text_tower.model_name={tiny_text_model}"]
    args += [f"--trainer.default_root_dir={tmp_path}", f"--data.cache_dir={tmp_path}"]
    default = build_cli(args, run=False).trainer
    assert isinstance(default.strategy.checkpoint_io, AtomicCheckpointIO)
    environment = "lightning.pytorch.plugins.environments.LightningEnvironment"
    own = build_cli(
        [*args, f"--trainer.plugins={environment}", "--trainer.strategy=ddp"], run=False
    ).trainer
    assert isinstance(own.strategy.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(own.strategy.cluster_environment, LightningEnvironment)  # theirs, kept
    # a CheckpointIO of the user's own is kept as it is
    theirs = TorchCheckpointIO()
    assert with_atomic_checkpoints([theirs]) == [theirs]
    assert with_atomic_checkpoints(theirs) is theirs
    (added,) = with_atomic_checkpoints(None)
    assert isinstance(added, AtomicCheckpointIO)


# --------------------------------------------------------------- random generators
def draws() -> tuple:
    import random

    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_generator_states_survive_a_weights_only_checkpoint(
    tiny_text_model: str, tmp_path: Path
) -> None:
    """The states a checkpoint keeps are set again when the resumed run starts training."""
    saving = tiny_module(tiny_text_model)
    saving.trainer = SimpleNamespace(world_size=1)
    checkpoint: dict = {}
    saving.on_save_checkpoint(checkpoint)
    expected = draws()
    torch.save(checkpoint, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)

    resuming = tiny_module(tiny_text_model)  # draws while the run is set up
    fitting = SimpleNamespace(fn=TrainerFn.FITTING)
    resuming.trainer = SimpleNamespace(world_size=1, global_rank=0, state=fitting)
    resuming.on_load_checkpoint(loaded)
    draws()
    resuming.on_train_start()
    assert draws() == expected

    validating = tiny_module(tiny_text_model)  # only a fit takes the states
    validating.trainer = SimpleNamespace(
        world_size=1, global_rank=0, state=SimpleNamespace(fn=TrainerFn.VALIDATING)
    )
    validating.on_load_checkpoint(loaded)
    validating.on_train_start()
    assert draws() != expected


@pytest.mark.ddp
def test_every_process_resumes_with_its_own_generator_states(tmp_path: Path) -> None:
    run_distributed(gather_work, 2, tmp_path, str(tmp_path / "rank"))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}")
        assert result["own"] == [r == rank for r in range(2)] and result["picked"]
    assert rng.for_rank([{}, {}], 0, 3) is None  # another number of processes: none


# ------------------------------------------------------------ killed and resumed runs
# The top image stage and the text layer trained over cached frozen prefixes.
UNLOCKED = ["--model.image_tower.unlocked_blocks=1", "--model.text_tower.unlocked_layers=1"]


def fit_args(
    text_model: str,
    root: Path,
    cache: Path,
    overlay: list[str] | None,
    workers: int,
    extra: list[str] | None = None,
) -> list:
    """A two-epoch tiny run that checkpoints every step into ``root/steps``."""
    return [
        "fit",
        "--config",
        TINY,
        *(arg for layer in overlay or () for arg in ("--config", layer)),
        *(extra or ()),
        f"--model.text_tower.model_name={text_model}",
        *(
            [f"--data.clusters.text_model={text_model}", "--data.clusters.num_clusters=4"]
            if overlay
            else []
        ),
        f"--data.cache_dir={cache}",
        f"--data.num_workers={workers}",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=2",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={root / 'steps'}",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_last=true",
    ]


def command_line(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adaptalign", *args],
        cwd=ROOT,  # ``-m`` puts it first on sys.path, so ``tests.helpers.killer`` imports
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_same(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def streamed(tmp_path: Path, cache: Path) -> list[str]:
    """The tiny data set written as 6 shards of 8 pairs, and the settings that stream them."""
    assert main(["shards", str(tmp_path / "shards"), "--config", TINY, "--shard-size", "8"]) == 0
    data = yaml.safe_load((tmp_path / "shards" / "data.yaml").read_text())["data"]
    return [f"--data.{key}={value}" for key, value in data.items()]


@pytest.mark.parametrize(
    ("overlay", "workers", "extra"),
    [
        (None, 1, None),
        (COMBINED_METHODS, 0, None),
        (COMBINED_METHODS, 0, UNLOCKED),
        (COMBINED_METHODS, 1, "streamed"),
    ],
    ids=[
        "random-sampler-1-worker",
        "combined-methods-curriculum",
        "combined-methods-unlocked-tops-over-cached-prefixes",
        "combined-methods-streamed-from-shards-1-worker",
    ],
)
@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_exactly(
    overlay: list[str] | None,
    workers: int,
    extra: list[str] | str | None,
    tiny_text_model: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "cache"
    if extra == "streamed":  # one worker streams all 6 shards: 3 batches an epoch, as in memory
        monkeypatch.setenv("ADAPTALIGN_CACHE", str(cache))
        extra = streamed(tmp_path, cache)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    main(fit_args(tiny_text_model, whole, cache, overlay, workers, extra))  # uninterrupted

    # 3 batches an epoch: killed after step 4, one batch into the second epoch
    args = fit_args(tiny_text_model, killed, cache, overlay, workers, extra)
    killer = ["--trainer.callbacks+=tests.helpers.killer.KillAt", "--trainer.callbacks.step=4"]
    died = command_line([*args, *killer])
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    last = killed / "steps" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 4
    assert saved["AlignmentDataModule"] == {"train_loader": {"epoch": 1, "batches": 1}}
    assert not [p for p in last.parent.iterdir() if p.suffix != ".ckpt"]

    resumed = command_line([*args, f"--ckpt_path={last}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr

    reference = torch.load(whole / "steps" / "last.ckpt", weights_only=True)
    result = torch.load(last, weights_only=True)
    assert result["global_step"] == reference["global_step"] == 6
    assert_same(result["state_dict"], reference["state_dict"], "weights")
    assert_same(result["optimizer_states"], reference["optimizer_states"], "optimizer")
    methods = {k: v for k, v in reference["callbacks"].items() if "ModelCheckpoint" not in k}
    # MM-TS, loss weights, curriculum, ARL; always the final report and the collapse watch
    assert len(methods) == (6 if overlay else 2)
    for key, state in methods.items():
        assert_same(result["callbacks"][key], state, key)
    # validation after the last epoch: the resumed run logged to a new version folder
    expected = final_validation(whole / "lightning_logs" / "version_0")
    assert "val/rsum" in expected
    assert final_validation(killed / "lightning_logs" / "version_1") == expected


@pytest.mark.slow
def test_a_comparison_run_killed_after_an_epoch_goes_on_where_it_stopped(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``adaptalign compare`` does after a pre-emption: the fit goes on from the epoch-end
    ``last.ckpt`` in its own log folder, and ends as the uninterrupted run does, each validation
    recorded once."""
    import json

    from adaptalign.experiments.compare_runs import Run, execute, fit_command

    monkeypatch.chdir(ROOT)  # ``-m`` puts it first on sys.path, so ``tests.helpers.killer`` imports
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    overrides = [
        f"--model.text_tower.model_name={tiny_text_model}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.max_epochs=3",
    ]
    whole = Run("tiny", TINY, None, 0, tmp_path / "whole")
    assert execute(whole, overrides).ok

    killed = Run("tiny", TINY, None, 0, tmp_path / "killed")
    # 3 batches an epoch: dies at the start of the second epoch, after its first validation
    killer = ["--trainer.callbacks+=tests.helpers.killer.KillAt", "--trainer.callbacks.step=3"]
    died = execute(killed, [*overrides, *killer])
    assert died.returncode == -signal.SIGKILL and not killed.finished(), died.log_tail
    record = json.loads((killed.folder / "run.json").read_text())  # as if killed from outside
    record["arguments"] = fit_command(killed, overrides)[1:]
    (killed.folder / "run.json").write_text(json.dumps(record))

    resumed = execute(killed, overrides)
    assert resumed.ok, resumed.log_tail
    assert "--ckpt_path" in (killed.folder / "log.txt").read_text()
    assert sorted(p.name for p in killed.folder.iterdir() if p.is_dir()) == ["version_0"]
    reference = json.loads(whole.summary_path.read_text())
    result = json.loads(killed.summary_path.read_text())
    assert [entry["epoch"] for entry in result["history"]] == [0, 1, 2]
    assert result["history"] == reference["history"]
    checkpoint = Path("version_0") / "checkpoints" / "last.ckpt"
    expected = torch.load(whole.folder / checkpoint, weights_only=True)["state_dict"]
    assert_same(
        torch.load(killed.folder / checkpoint, weights_only=True)["state_dict"], expected, "weights"
    )
    assert final_validation(killed.folder / "version_0") == final_validation(
        whole.folder / "version_0"
    )
