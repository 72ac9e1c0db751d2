"""Cutting timm image models below their last N blocks: where the cut lies, what each half does."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import Tensor, nn

from adaptalign.common.errors import ConfigurationError
from adaptalign.lightning_modules.image_split import (
    ImageSplit,
    image_block_count,
    image_parameter_depths,
    split_image_model,
)

# name: (timm kwargs, image size, blocks in timm's coarse grouping)
MODELS = {
    "resnet18": ({}, 64, 4),
    "tf_efficientnet_lite0": ({}, 32, 7),
    "vit_tiny_patch16_224": ({"img_size": 32}, 32, 12),
    "convnext_atto": ({}, 32, 4),
}

# name: (parameter prefixes that train with N=1, stem prefixes that never train)
BY_HAND = {
    "resnet18": (("layer4.",), ("conv1.", "bn1.")),
    "tf_efficientnet_lite0": (("blocks.6.", "conv_head.", "bn2."), ("conv_stem.", "bn1.")),
    "vit_tiny_patch16_224": (("blocks.11.", "norm."), ("cls_token", "pos_embed", "patch_embed.")),
    "convnext_atto": (("stages.3.", "head.norm."), ("stem.",)),
}


def build(name: str, seed: int = 0, **extra: object) -> nn.Module:
    """A randomly initialised timm backbone in eval mode, pooled features out."""
    kwargs, _, _ = MODELS[name]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs, **extra).eval()


def images(name: str, count: int = 3, dtype: torch.dtype = torch.float32) -> Tensor:
    """A batch of random images of the size the model is tested at."""
    size = MODELS[name][1]
    return torch.randn((count, 3, size, size), generator=torch.Generator().manual_seed(1)).to(dtype)


def split(backbone: nn.Module, name: str, unlocked: int) -> ImageSplit:
    """The split for N unlocked blocks at the test image size."""
    size = MODELS[name][1]
    return split_image_model(backbone, name, unlocked, (3, size, size))


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    """Each test model once per module: splitting leaves its mode, weights and buffers alone."""
    return request.param, build(request.param)


def test_block_counts_follow_timms_coarse_grouping(model: tuple[str, nn.Module]) -> None:
    name, backbone = model
    assert image_block_count(backbone, name) == MODELS[name][2]


@pytest.mark.parametrize("which", ["one", "all"])
def test_suffix_of_prefix_gives_the_backbones_features(
    model: tuple[str, nn.Module], which: str
) -> None:
    name, backbone = model
    unlocked = 1 if which == "one" else MODELS[name][2]
    cut = split(backbone, name, unlocked)
    x = images(name)
    with torch.no_grad():
        expected = backbone(x)
        hidden = cut.prefix(backbone, x)
        actual = cut.suffix(backbone, hidden)
    assert actual.shape == (3, backbone.num_features)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    assert tuple(hidden.shape[1:]) == cut.prefix_shape
    assert (cut.unlocked_blocks, cut.block_count) == (unlocked, MODELS[name][2])


@pytest.mark.parametrize("which", ["one", "all"])
def test_unlocked_parameters_are_the_last_groups_and_the_top(
    model: tuple[str, nn.Module], which: str
) -> None:
    name, backbone = model
    top_block, stem = BY_HAND[name]
    names = {parameter for parameter, _ in backbone.named_parameters()}
    if which == "one":
        cut = split(backbone, name, 1)
        assert cut.unlocked_parameters == {n for n in names if n.startswith(top_block)}
    else:
        cut = split(backbone, name, MODELS[name][2])
        assert cut.unlocked_parameters == {n for n in names if not n.startswith(stem)}


def test_efficientnet_unlocks_its_stages_from_the_top_down() -> None:
    backbone = build("tf_efficientnet_lite0")
    names = {parameter for parameter, _ in backbone.named_parameters()}
    two = split(backbone, "tf_efficientnet_lite0", 2)
    expected = ("blocks.5.", "blocks.6.", "conv_head.", "bn2.")
    assert two.unlocked_parameters == {n for n in names if n.startswith(expected)}
    assert two.boundary == "blocks.5"


@pytest.mark.parametrize(
    ("name", "one", "every"),
    [
        ("resnet18", "layer4", "layer1"),
        ("tf_efficientnet_lite0", "blocks.6", "blocks.0"),
        ("vit_tiny_patch16_224", "blocks.11", "blocks.0"),
        ("convnext_atto", "stages.3", "stages.0"),
    ],
)
def test_boundary_names_the_first_unlocked_block(name: str, one: str, every: str) -> None:
    backbone = build(name)
    assert split(backbone, name, 1).boundary == one
    assert split(backbone, name, MODELS[name][2]).boundary == every


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("resnet18", (256, 4, 4)),  # layer3's output at 64 px
        ("tf_efficientnet_lite0", (192, 1, 1)),  # stage 5's output at 32 px
        ("vit_tiny_patch16_224", (5, 192)),  # 2x2 patches and the class token
        ("convnext_atto", (160, 2, 2)),  # stage 2's output, channels first
    ],
)
def test_prefix_shape_is_the_feature_map_entering_the_last_block(
    name: str, shape: tuple[int, ...]
) -> None:
    backbone = build(name)
    cut = split(backbone, name, 1)
    assert cut.prefix_shape == shape
    with torch.no_grad():
        assert tuple(cut.prefix(backbone, images(name)).shape) == (3, *shape)


def test_prefix_state_covers_parameters_and_buffers_below_the_cut() -> None:
    backbone = build("resnet18")
    cut = split(backbone, "resnet18", 1)
    state = set(backbone.state_dict())
    assert cut.prefix_state_names == {key for key in state if not key.startswith("layer4.")}
    assert "layer3.1.bn2.running_var" in cut.prefix_state_names
    assert "bn1.num_batches_tracked" in cut.prefix_state_names


def test_vit_prefix_state_is_everything_but_the_last_block_and_norm() -> None:
    backbone = build("vit_tiny_patch16_224")
    cut = split(backbone, "vit_tiny_patch16_224", 1)
    state = set(backbone.state_dict())
    expected = {key for key in state if not key.startswith(("blocks.11.", "norm."))}
    assert cut.prefix_state_names == expected
    assert {"cls_token", "pos_embed"} <= cut.prefix_state_names


def test_frozen_modules_list_every_stateful_module_below_the_cut() -> None:
    backbone = build("resnet18")
    cut = split(backbone, "resnet18", 1)
    stateful = {
        name
        for name, module in backbone.named_modules()
        if [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    }
    below = {name for name in stateful if not name.startswith("layer4")}
    assert below <= set(cut.frozen_modules)
    assert not any(name.startswith("layer4") for name in cut.frozen_modules)


def test_too_many_blocks_are_refused_with_the_full_range() -> None:
    backbone = build("tf_efficientnet_lite0")
    with pytest.raises(ConfigurationError) as error:
        split(backbone, "tf_efficientnet_lite0", 9)
    assert str(error.value) == (
        "model.image_tower.unlocked_blocks=9: tf_efficientnet_lite0 has 7 blocks "
        '(timm\'s stage grouping); expected 0..7 or "all"'
    )


@pytest.mark.parametrize("unlocked", [0, -1])
def test_no_blocks_or_negative_blocks_are_refused(unlocked: int) -> None:
    backbone = build("tf_efficientnet_lite0")
    with pytest.raises(ConfigurationError, match=rf"unlocked_blocks={unlocked}: .*0\.\.7"):
        split(backbone, "tf_efficientnet_lite0", unlocked)


class Wrapped(nn.Module):
    """A timm model inside a plain module, which has no block grouping of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build("resnet18")

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


def test_a_model_without_group_matcher_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"unlocked_blocks: wrapped_resnet has no timm"):
        split_image_model(Wrapped(), "wrapped_resnet", 1, (3, 32, 32))
    with pytest.raises(ConfigurationError, match="wrapped_resnet"):
        image_block_count(Wrapped(), "wrapped_resnet")


class TwoBlocks(nn.Module):
    """A stem and two blocks, grouped the way timm groups its models."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1) for _ in range(2)])

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return {"stem": r"^stem", "blocks": r"^blocks\.(\d+)"}

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks[1](self.blocks[0](self.stem(x))).mean((2, 3))


class SkipOverBlock(TwoBlocks):
    """The stem's output skips the first block, so two values cross the cut below the last one."""

    def forward(self, x: Tensor) -> Tensor:
        stem = self.stem(x)
        return (self.blocks[1](self.blocks[0](stem)) + stem).mean((2, 3))


class NoCoarseGrouping(TwoBlocks):
    """A matcher that refuses coarse grouping, as some timm models' do."""

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        raise NotImplementedError("coarse grouping is not implemented")


class DataDependent(TwoBlocks):
    """A branch on the images' values, which torch.fx cannot trace."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) if x.sum() > 0 else super().forward(-x)


class CountsCalls(TwoBlocks):
    """Output that depends on Python state: a trace fixes it, so the split drifts from the model."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return super().forward(x) * self.calls


def test_any_module_with_a_matcher_can_be_split() -> None:
    backbone = TwoBlocks().eval()
    assert image_block_count(backbone, "two_blocks") == 2
    cut = split_image_model(backbone, "two_blocks", 1, (3, 8, 8))
    assert cut.unlocked_parameters == {"blocks.1.weight", "blocks.1.bias"}
    assert cut.frozen_modules == ("stem", "blocks.0")
    assert cut.prefix_shape == (4, 8, 8)


def test_a_matcher_timm_cannot_use_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"unlocked_blocks: timm cannot group no_coarse"):
        split_image_model(NoCoarseGrouping(), "no_coarse", 1, (3, 8, 8))


def test_a_cut_that_two_values_cross_is_refused() -> None:
    backbone = SkipOverBlock().eval()
    with pytest.raises(ConfigurationError, match=r"unlocked_blocks=1 for skip: .* not one feature"):
        split_image_model(backbone, "skip", 1, (3, 8, 8))
    split_image_model(backbone, "skip", 2, (3, 8, 8))  # below the first block only the stem's


def test_an_untraceable_model_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"unlocked_blocks=1 for branchy: torch.fx cannot"):
        split_image_model(DataDependent(), "branchy", 1, (3, 8, 8))


def test_a_split_that_does_not_reproduce_the_model_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"counting: in eval mode .* differs .* by up to"):
        split_image_model(CountsCalls(), "counting", 1, (3, 8, 8))


def test_the_split_follows_the_backbone_to_another_dtype() -> None:
    backbone = build("convnext_atto")
    cut = split(backbone, "convnext_atto", 1)
    backbone.to(torch.float64)
    x = images("convnext_atto", dtype=torch.float64)
    with torch.no_grad():
        actual = cut.suffix(backbone, cut.prefix(backbone, x))
        expected = backbone(x)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected)


def test_the_split_sees_weights_loaded_after_it_was_made() -> None:
    backbone = build("tf_efficientnet_lite0")
    cut = split(backbone, "tf_efficientnet_lite0", 2)
    x = images("tf_efficientnet_lite0")
    with torch.no_grad():
        before = cut.suffix(backbone, cut.prefix(backbone, x))
        backbone.load_state_dict(build("tf_efficientnet_lite0", seed=1).state_dict())
        after = cut.suffix(backbone, cut.prefix(backbone, x))
        expected = backbone(x)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "vit_tiny_patch16_224"])
def test_only_unlocked_parameters_get_gradients(name: str) -> None:
    backbone = build(name).train()
    cut = split(backbone, name, 2)
    x = images(name)
    cut.suffix(backbone, cut.prefix(backbone, x).detach()).square().mean().backward()
    trained = {n for n, p in backbone.named_parameters() if p.grad is not None}
    assert trained == cut.unlocked_parameters


def test_train_mode_suffix_keeps_stochastic_depth() -> None:
    name = "vit_tiny_patch16_224"
    backbone = build(name, drop_path_rate=0.5)
    cut = split(backbone, name, MODELS[name][2])  # the prefix holds no random layers
    x = images(name)
    backbone.train()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(3)
        expected = backbone(x)
        torch.manual_seed(3)
        actual = cut.suffix(backbone, cut.prefix(backbone, x))
        backbone.eval()
        deterministic = cut.suffix(backbone, cut.prefix(backbone, x))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(actual, deterministic, atol=1e-3)


def test_splitting_leaves_modes_buffers_and_global_random_numbers_alone() -> None:
    backbone = build("tf_efficientnet_lite0").train()
    backbone.bn1.eval()
    buffers = {name: b.clone() for name, b in backbone.named_buffers()}
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    split(backbone, "tf_efficientnet_lite0", 3)
    assert torch.equal(torch.rand(4), expected)
    assert backbone.training and backbone.blocks.training and not backbone.bn1.training
    for name, value in backbone.named_buffers():
        assert torch.equal(value, buffers[name]), name


class Reordered(TwoBlocks):
    """Reorders channels by an index derived from a buffer outside any traced operation."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("order", torch.arange(3, -1, -1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.blocks[0](self.stem(x))
        return self.blocks[1](hidden[:, self.order.flip(0)]).mean((2, 3))


def test_tensors_a_trace_fixes_stay_with_the_split_and_follow_the_input() -> None:
    backbone = Reordered().eval()
    attributes = set(vars(backbone))
    cut = split_image_model(backbone, "reordered", 1, (3, 8, 8))
    assert set(vars(backbone)) == attributes
    assert cut.eval_constants and cut.train_constants
    backbone.to("meta")  # another device, without needing one
    features = cut.suffix(backbone, cut.prefix(backbone, torch.empty(2, 3, 8, 8, device="meta")))
    assert (features.device.type, tuple(features.shape)) == ("meta", (2, 4))
    assert all(c.device.type == "meta" for c in cut.eval_constants.values())


def test_swin_windows_can_be_cut() -> None:
    torch.manual_seed(0)
    backbone = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=2,
        window_size=2,
        embed_dim=16,
        depths=(1, 1, 2, 1),
        num_heads=(1, 1, 1, 1),
    ).eval()
    assert image_block_count(backbone, "swin") == 4
    x = torch.randn(2, 3, 32, 32)
    for unlocked, boundary in ((1, "layers.3"), (4, "layers.0")):
        cut = split_image_model(backbone, "swin", unlocked, (3, 32, 32))
        assert cut.boundary == boundary
        with torch.no_grad():
            actual = cut.suffix(backbone, cut.prefix(backbone, x))
            torch.testing.assert_close(actual, backbone(x), atol=1e-5, rtol=1e-4)


def test_depths_count_blocks_down_from_the_top() -> None:
    depths = image_parameter_depths(TwoBlocks(), "two_blocks", "model.tower_lr_decay")
    assert depths == {
        "stem.weight": 3,
        "stem.bias": 3,
        "blocks.0.weight": 2,
        "blocks.0.bias": 2,
        "blocks.1.weight": 1,
        "blocks.1.bias": 1,
    }


def test_a_model_without_blocks_has_no_depths_for_a_decay() -> None:
    expected = r"model.tower_lr_decay: timm cannot group no_coarse's layers into blocks \(coarse"
    with pytest.raises(ConfigurationError, match=expected):
        image_parameter_depths(NoCoarseGrouping(), "no_coarse", "model.tower_lr_decay")
