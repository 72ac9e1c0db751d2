"""Each tower's trained head: a linear map or a 2-layer MLP, its sizes by hand, its refusals,
and an MLP head over frozen towers that learns."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.lightning_modules.heads import HeadSpec
from tests.helpers.builders import quiet_trainer, tiny_module


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_heads_have_the_sizes_their_layers_say() -> None:
    linear = HeadSpec("linear").build(8, 4)
    assert parameters(linear) == 8 * 4 + 4
    mlp = HeadSpec("mlp").build(8, 4)  # hidden width: the feature width, 8
    assert parameters(mlp) == (8 * 8 + 8) + (8 * 4 + 4)
    narrow = HeadSpec("mlp", hidden=5).build(8, 4)
    assert parameters(narrow) == (8 * 5 + 5) + (5 * 4 + 4)
    x = torch.randn(3, 8)
    first, activation, second = narrow
    assert isinstance(activation, nn.GELU)
    assert torch.allclose(narrow(x), second(torch.nn.functional.gelu(first(x))))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (HeadSpec("mlp", hidden=0), "projection_hidden=0; expected an integer >= 1"),
        (HeadSpec("linear", hidden=64), "projection=linear has no hidden layer"),
        (HeadSpec("conv"), "projection='conv'; expected one of"),  # type: ignore[arg-type]
    ],
)
def test_a_head_that_cannot_be_built_is_refused(spec: HeadSpec, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        spec.check()


@pytest.mark.slow
def test_an_mlp_head_over_frozen_towers_learns_and_only_the_heads_train(
    tiny_text_model: str, tmp_path: Path
) -> None:
    L.seed_everything(0)
    module = tiny_module(
        tiny_text_model,
        image={"freeze": True},
        text={"freeze": True},
        embed_dim=32,
        projection="mlp",
        projection_hidden=48,
        lr=5e-3,
    )
    for tower in (module.image_tower, module.text_tower):
        assert [type(layer) for layer in tower.projection] == [nn.Linear, nn.GELU, nn.Linear]
        assert tower.projection[0].out_features == 48
    start = {k: v.clone() for k, v in module.state_dict().items()}
    data = AlignmentDataModule(
        generated=GeneratedConfig(
            num_train=256, num_val=32, num_test=32, image_size=32, max_objects=2
        ),
        cache_dir=str(tmp_path),
        batch_size=32,
    )
    trainer = quiet_trainer(max_epochs=6)
    (before,) = trainer.validate(module, data, verbose=False)
    trainer.fit(module, data)
    (after,) = trainer.validate(module, data, verbose=False)
    assert after["val/rsum"] > before["val/rsum"] + 50, (before, after)
    end = module.state_dict()
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    heads = {k for k in start if ".projection." in k}
    assert heads <= moved  # both layers of both heads trained
    assert not {k for k in moved if ".backbone." in k and "running" not in k}  # towers frozen
