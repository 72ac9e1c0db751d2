"""Training streamed from WebDataset shards: it learns, counts its pairs, and runs under DDP."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adaptalign.callbacks.stream_counts import StreamCounts
from adaptalign.cli import main
from adaptalign.datamodules.datamodule import AlignmentDataModule
from tests.helpers.builders import quiet_trainer, tiny_module
from tests.helpers.command_line import run_adaptalign

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


def write_shards(folder: Path, generated: dict, shard_size: int) -> dict:
    """A generated data set written as shards; the data settings that stream them."""
    config = folder / "fit.yaml"
    config.write_text(yaml.safe_dump({"data": {"generated": generated}}))
    args = ["shards", str(folder / "shards"), "--config", str(config)]
    assert main([*args, "--shard-size", str(shard_size)]) == 0
    return yaml.safe_load((folder / "shards" / "data.yaml").read_text())["data"]


class Seen(StreamCounts):
    """Keeps each epoch's count of streamed pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.per_epoch: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.per_epoch.append(int(self.totals[0]))
        super().on_train_epoch_end(trainer, pl_module)


@pytest.mark.slow
def test_a_fit_streamed_from_shards_learns_and_sees_every_pair_each_epoch(
    tiny_text_model: str, tmp_path: Path, cache_dir: Path
) -> None:
    generated = {"num_train": 256, "num_val": 32, "num_test": 32, "image_size": 32}
    shards = write_shards(tmp_path, {**generated, "max_objects": 2}, shard_size=64)
    module = tiny_module(tiny_text_model, embed_dim=32, lr=5e-3, tower_lr=1e-3)
    data = AlignmentDataModule(**shards, batch_size=32, shuffle_buffer=64)
    seen = Seen()
    trainer = quiet_trainer(max_epochs=8, callbacks=[seen])
    (before,) = trainer.validate(module, data, verbose=False)
    trainer.fit(module, data)
    (after,) = trainer.validate(module, data, verbose=False)
    assert seen.per_epoch == [256] * 8
    chance = 100 / 32  # R@1 of a random ranking over 32 val images
    assert before["val/t2i_R@1"] < 3 * chance
    assert after["val/t2i_R@1"] > 4 * chance, after
    assert after["val/i2t_R@1"] > 4 * chance, after
    assert after["val/rsum"] > before["val/rsum"] + 100


@pytest.mark.ddp
def test_ddp_with_two_workers_each_streams_every_pair_once_over_frozen_features(
    tiny_text_model: str, tmp_path: Path
) -> None:
    """2 processes x 2 loader workers over 6 shards of 8 pairs, a frozen image tower: each
    process extracts the features of its own shards, one chunk each, and every epoch trains on
    all 48 pairs once."""
    cache = tmp_path / "cache"
    tiny = yaml.safe_load(TINY.read_text())
    generated = tiny["data"]["generated"]
    folder = tmp_path / "data"
    folder.mkdir()
    settings = write_shards(folder, generated, shard_size=8)
    result = run_adaptalign(
        [
            "fit",
            "--config",
            str(TINY),
            *(f"--data.{key}={value}" for key, value in settings.items()),
            f"--model.text_tower.model_name={tiny_text_model}",
            "--model.image_tower.freeze=true",
            "--data.batch_size=8",
            "--data.num_workers=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.max_epochs=2",
        ],
        cache,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for epoch in (0, 1):
        assert f"epoch {epoch}: 48 pairs streamed, 0 bad samples skipped, 0 repeated" in (
            result.stderr + result.stdout
        )
