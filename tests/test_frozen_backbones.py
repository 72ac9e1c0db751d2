"""Checkpoints leave out frozen backbones that building the model loads again, and load the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.lightning_modules import frozen_backbones
from adaptalign.lightning_modules.system import AlignmentModule
from tests.helpers.builders import quiet_trainer, tiny_module


def image_weights(folder: Path, seed: int = 1) -> str:
    """A state dict for the tiny timm CNN, as a downloaded weights file would hold."""
    torch.manual_seed(seed)
    path = folder / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), path)
    return str(path)


def fitted(module: AlignmentModule, root: Path) -> Path:
    """One epoch with the command line's checkpointing; the last checkpoint's path."""
    data = AlignmentDataModule(
        generated=GeneratedConfig(num_train=16, num_val=8, num_test=8, image_size=32),
        cache_dir=str(root / "cache"),
        batch_size=8,
    )
    quiet_trainer(max_epochs=1, default_root_dir=root, enable_checkpointing=True).fit(module, data)
    (checkpoint,) = (root / "checkpoints").glob("*.ckpt")
    return checkpoint


def same_weights(a: AlignmentModule, b: AlignmentModule) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for key, value in left.items():
        assert torch.equal(value, right[key]), key


@pytest.mark.slow
def test_a_checkpoint_keeps_a_digest_of_sourced_frozen_backbones_and_loads_whole(
    tiny_text_model: str, tmp_path: Path
) -> None:
    weights = image_weights(tmp_path)
    module = tiny_module(
        tiny_text_model,
        image={"freeze": True, "checkpoint_path": weights},
        text={"freeze": True},
    )
    checkpoint = fitted(module, tmp_path / "run")
    saved = torch.load(checkpoint, weights_only=True)
    keys = list(saved["state_dict"])
    assert not [k for k in keys if k.startswith(("image_tower.backbone.", "text_tower.backbone."))]
    assert any(k.startswith("image_tower.projection.") for k in keys)
    record = saved[frozen_backbones.KEY]
    assert record["image_tower"]["source"] == f"model.image_tower.checkpoint_path={weights!r}"
    assert record["text_tower"]["source"] == f"model.text_tower.model_name={tiny_text_model!r}"
    assert record["text_tower"]["digest"] == frozen_backbones.weights_digest(
        module.text_tower.backbone
    )

    # Built from the checkpoint, whatever the seed: the backbones come from their sources.
    torch.manual_seed(123)
    same_weights(AlignmentModule.load_from_checkpoint(checkpoint), module)

    # Another file at the same path: the checkpoint refuses it rather than load other weights.
    image_weights(tmp_path, seed=2)
    refused = r"frozen image tower loaded from model\.image_tower\.checkpoint_path"
    with pytest.raises(ConfigurationError, match=refused):
        AlignmentModule.load_from_checkpoint(checkpoint)


@pytest.mark.slow
def test_backbones_that_train_or_are_drawn_at_random_stay_in_the_checkpoint(
    tiny_text_model: str, tmp_path: Path
) -> None:
    module = tiny_module(tiny_text_model, image={"freeze": True})  # a random frozen CNN
    checkpoint = fitted(module, tmp_path / "run")
    saved = torch.load(checkpoint, weights_only=True)
    assert frozen_backbones.KEY not in saved
    assert saved["state_dict"].keys() == module.state_dict().keys()

    torch.manual_seed(123)  # another draw: only the checkpoint holds the CNN the run used
    same_weights(AlignmentModule.load_from_checkpoint(checkpoint), module)


def test_a_checkpoint_holding_every_weight_loads_as_before(tiny_text_model: str) -> None:
    module = tiny_module(tiny_text_model, text={"freeze": True})
    towers = {"image_tower": module.image_tower, "text_tower": module.text_tower}
    whole = {"state_dict": dict(module.state_dict())}
    frozen_backbones.put_back(towers, whole)
    assert whole["state_dict"].keys() == module.state_dict().keys()

    slim = {"state_dict": dict(module.state_dict())}
    frozen_backbones.leave_out(towers, slim)
    assert set(slim["state_dict"]) < set(whole["state_dict"])
    frozen_backbones.put_back(towers, slim)
    assert slim["state_dict"].keys() == whole["state_dict"].keys()
    for key, value in whole["state_dict"].items():
        assert torch.equal(slim["state_dict"][key], value), key
