"""The system's contract with callbacks: controls in (consumed each step), statistics out."""

from __future__ import annotations

import math
import re
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adaptalign.common.errors import ConfigurationError
from adaptalign.encoders import text_split
from adaptalign.lightning_modules.controls import (
    ControlledSystem,
    Controls,
    LossTerm,
    StepEmbeddings,
)
from adaptalign.lightning_modules.losses import info_nce, max_margin
from adaptalign.lightning_modules.optimisation import warmup_cosine
from adaptalign.lightning_modules.system import AlignmentModule
from tests.helpers.builders import quiet_trainer, tiny_module


@pytest.fixture()
def module(tiny_text_model: str) -> AlignmentModule:
    return tiny_module(tiny_text_model, temperature=0.1).eval()


@pytest.fixture()
def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    texts = ["a red circle", "a blue square", "a green star at the top", "two small hearts"]
    return {"images": torch.randn(4, 3, 32, 32, generator=g), "texts": texts}


def sims(module: AlignmentModule, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    image, text = module.encode_images(batch), module.encode_texts(batch)
    return image @ text.T, text @ image.T


def test_embeddings_are_unit_length(module: AlignmentModule, batch: dict) -> None:
    assert torch.allclose(module.encode_images(batch).norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.allclose(module.encode_texts(batch).norm(dim=1), torch.ones(4), atol=1e-6)


def test_default_step_uses_own_temperature(module: AlignmentModule, batch: dict) -> None:
    out = module.training_step(batch, 0)
    s_i2t, s_t2i = sims(module, batch)
    expected, _, _ = info_nce(s_i2t, s_t2i, torch.arange(4), 0.1)
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert out["statistics"].temperature.tolist() == pytest.approx([0.1] * 4)


def test_controls_are_used_once_then_reset(module: AlignmentModule, batch: dict) -> None:
    tau = torch.tensor([0.05, 0.1, 0.2, 0.4])
    module.controls.temperature = tau
    module.controls.direction_weights = (1.5, 0.5)
    module.controls.loss_scale = 2.0
    out = module.training_step(batch, 0)
    s_i2t, s_t2i = sims(module, batch)
    expected, _, _ = info_nce(s_i2t, s_t2i, torch.arange(4), tau, (1.5, 0.5))
    assert float(out["loss"].detach()) == pytest.approx(2.0 * float(expected), rel=1e-5)
    assert out["statistics"].temperature.tolist() == pytest.approx(tau.tolist())
    assert out["controls"].loss_scale == 2.0
    assert module.controls == Controls()  # the next step starts from the defaults


def test_the_loss_stays_float32_under_bf16_autocast(module: AlignmentModule) -> None:
    """Mixed precision runs the towers in bfloat16, never the logits or the temperatures."""
    g = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(8, 32, generator=g), dim=1)
    text = torch.nn.functional.normalize(image + 0.3 * torch.randn(8, 32, generator=g), dim=1)
    tau = torch.linspace(0.01, 0.07, 8)  # MM-TS-like per-sample temperatures
    expected, _, _ = info_nce(image @ text.T, text @ image.T, torch.arange(8), tau)
    controls = Controls(temperature=tau)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (image @ text.T).dtype == torch.bfloat16  # autocast really is on here
        loss, _, stats, _ = module.contrastive_loss(image, text, {}, controls)
        features = torch.randn(2, module.image_tower.projection.in_features)
        rows = module.encode_images({"image_features": features})
    assert loss.dtype == torch.float32 and stats.temperature.dtype == torch.float32
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert torch.equal(stats.temperature, tau)
    assert rows.dtype == torch.float32  # unit rows leave the towers in float32


def test_extra_losses_are_added_with_their_weight(module: AlignmentModule, batch: dict) -> None:
    seen: list[StepEmbeddings] = []

    def norm_penalty(view: StepEmbeddings) -> torch.Tensor:
        seen.append(view)
        return view.image.sum() * 0 + 3.0

    plain = float(module.training_step(batch, 0)["loss"].detach())
    module.controls.extra_losses["bias"] = (0.5, norm_penalty)
    out = module.training_step(batch, 0)
    assert float(out["loss"].detach()) == pytest.approx(plain + 1.5, rel=1e-5)
    assert seen[0].all_text.shape == (4, 16) and seen[0].batch is batch


def test_extra_losses_hand_their_auxiliaries_back_through_the_outputs(
    module: AlignmentModule, batch: dict
) -> None:
    """What an extra loss learns in the step reaches its callback through the step's outputs."""

    def reporting(view: StepEmbeddings) -> LossTerm:
        return LossTerm(view.image.sum() * 0 + 2.0, {"rows": view.image.shape[0]})

    plain = module.training_step(batch, 0)
    assert plain["auxiliaries"] == {}
    module.controls.add_extra_loss("reporting", 0.5, reporting)
    module.controls.add_extra_loss("plain", 1.0, lambda view: view.text.sum() * 0 + 1.0)
    out = module.training_step(batch, 0)
    assert out["auxiliaries"] == {"reporting": {"rows": 4}}  # a plain tensor reports nothing
    added = float(out["loss"].detach()) - float(plain["loss"].detach())
    assert added == pytest.approx(0.5 * 2.0 + 1.0, rel=1e-5)


def test_validation_returns_the_embeddings_it_scored(module: AlignmentModule, batch: dict) -> None:
    ids = torch.arange(4)
    scored = {**batch, "image_id": ids, "text_id": ids, "text_image_id": ids}
    with torch.no_grad():
        out = module.validation_step(scored, 0)
        assert torch.equal(out["image_embeddings"], module.encode_images(scored))
        assert torch.equal(out["text_embeddings"], module.encode_texts(scored))
    assert module.val_retrieval.compute()["rsum"] >= 0  # and it scored them


def protocol_members(protocol: type) -> set[str]:
    """The attributes and methods a protocol lists."""
    methods = {
        name
        for name, value in vars(protocol).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }
    return set(typing.get_type_hints(protocol)) | methods


def test_the_system_offers_everything_callbacks_may_touch(module: AlignmentModule) -> None:
    assert isinstance(module, ControlledSystem)
    members = protocol_members(ControlledSystem)
    assert members == {"controls", "criterion", "device", "log"}
    for name in members:
        assert hasattr(module, name), name
    assert isinstance(module.controls, Controls) and module.criterion == "infonce"
    assert isinstance(module.device, torch.device)
    assert not isinstance(SimpleNamespace(controls=Controls(), device="cpu"), ControlledSystem)


def test_callbacks_touch_only_what_the_protocol_lists() -> None:
    """Every ``pl_module.<name>`` in the callbacks is a member of :class:`ControlledSystem`."""
    folder = Path(__file__).resolve().parents[1] / "adaptalign" / "callbacks"
    used = {}
    for path in sorted(folder.glob("*.py")):
        text = path.read_text()
        names = re.findall(r"\bpl_module\.(\w+)", text)
        names += re.findall(r"getattr\(pl_module, \"(\w+)\"", text)
        for name in names:
            used.setdefault(name, path.name)
    assert {"controls", "device", "log"} <= set(used)  # the scan finds what it should
    assert set(used) <= protocol_members(ControlledSystem), used


def test_tower_grad_scale_scales_each_towers_gradient(module: AlignmentModule, batch: dict) -> None:
    def grads() -> tuple[torch.Tensor, torch.Tensor]:
        module.zero_grad()
        module.training_step(batch, 0)["loss"].backward()
        return (
            module.image_tower.projection.weight.grad.clone(),
            module.text_tower.projection.weight.grad.clone(),
        )

    base_image, base_text = grads()
    module.controls.tower_grad_scale = (3.0, 0.5)
    scaled_image, scaled_text = grads()
    assert torch.allclose(scaled_image, 3.0 * base_image, atol=1e-6)
    assert torch.allclose(scaled_text, 0.5 * base_text, atol=1e-6)


def test_max_margin_criterion_with_per_sample_margin(tiny_text_model: str, batch: dict) -> None:
    m = tiny_module(
        tiny_text_model,
        criterion="max_margin",
        margin=0.3,
        hardest_negative=True,
    ).eval()
    s_i2t, s_t2i = sims(m, batch)
    expected, _, _ = max_margin(s_i2t, s_t2i, torch.arange(4), 0.3, hardest=True)
    assert float(m.training_step(batch, 0)["loss"].detach()) == pytest.approx(
        float(expected), rel=1e-5
    )
    margins = torch.tensor([0.1, 0.2, 0.3, 0.4])
    m.controls.margin = margins
    expected, _, _ = max_margin(s_i2t, s_t2i, torch.arange(4), margins, hardest=True)
    assert float(m.training_step(batch, 0)["loss"].detach()) == pytest.approx(
        float(expected), rel=1e-5
    )


def test_learnable_temperature_is_clamped(module: AlignmentModule) -> None:
    with torch.no_grad():
        module.log_scale.fill_(math.log(1 / 1e-4))  # would be tau = 1e-4
    assert float(module.temperature) == pytest.approx(0.01)
    with torch.no_grad():
        module.log_scale.fill_(math.log(1 / 50.0))
    assert float(module.temperature) == pytest.approx(1.0)


def test_warmup_then_cosine_schedule() -> None:
    assert warmup_cosine(0, 10, 110, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)


def built_optimizer(module: AlignmentModule, steps: int = 100) -> torch.optim.Optimizer:
    """The module's optimiser as ``fit`` builds it, outside a trainer (``steps`` for its
    schedule); the module is left without a trainer."""
    module.trainer = SimpleNamespace(estimated_stepping_batches=steps)  # type: ignore[assignment]
    optimizer = module.configure_optimizers()["optimizer"]
    module.trainer = None  # type: ignore[assignment]
    return optimizer


def test_optimizer_groups_separate_towers_and_projections(tiny_text_model: str) -> None:
    m = AlignmentModule(
        image_tower={"model_name": "test_resnet", "freeze": True},
        text_tower={"model_name": tiny_text_model},
        embed_dim=8,
        lr=1e-3,
        tower_lr=1e-5,
    )

    optimizer = built_optimizer(m)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    tower_ids = {id(p) for g in ("towers", "towers_no_decay") for p in by_name[g]["params"]}
    text_trainable = {id(p) for p in m.text_tower.backbone.parameters() if p.requires_grad}
    assert tower_ids == text_trainable  # the image backbone is frozen
    assert by_name["towers"]["initial_lr"] == 1e-5
    assert by_name["projections"]["initial_lr"] == 1e-3
    assert any(p is m.log_scale for p in by_name["projections_no_decay"]["params"])
    assert by_name["projections_no_decay"]["weight_decay"] == 0.0


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_towers_gradient_scale_moves_sgd_and_cancels_in_adamw(
    tiny_text_model: str, batch: dict, optimizer: str
) -> None:
    """ARL's modality weights scale a tower's gradients: SGD's first step scales with them, while
    AdamW's (gradient over its own running size) does not, up to its epsilon."""

    def first_update(scale: float) -> torch.Tensor:
        m = tiny_module(
            tiny_text_model, image={"freeze": True}, optimizer=optimizer, weight_decay=0.0, lr=1.0
        )  # a large step, so the difference of weights keeps its precision
        step = built_optimizer(m, steps=10)
        before = m.text_tower.projection.weight.detach().clone()
        m.controls = Controls(tower_grad_scale=(1.0, scale))
        m.training_step(batch, 0)["loss"].backward()
        step.step()
        return m.text_tower.projection.weight.detach() - before

    full, quarter = first_update(1.0), first_update(0.25)
    assert full.abs().max() > 0
    expected = 0.25 * full if optimizer == "sgd" else full
    assert torch.allclose(quarter, expected, rtol=1e-3, atol=1e-9)


def test_adamw_takes_the_betas_it_is_given(tiny_text_model: str) -> None:
    given = built_optimizer(tiny_module(tiny_text_model, adam_betas=(0.9, 0.95)))
    default = built_optimizer(tiny_module(tiny_text_model))
    assert {g["betas"] for g in given.param_groups} == {(0.9, 0.95)}
    assert {g["betas"] for g in default.param_groups} == {(0.9, 0.999)}


@pytest.mark.parametrize("betas", [(0.9, 1.0), (-0.1, 0.99), (0.9,)])
def test_adam_betas_outside_0_1_are_refused(tiny_text_model: str, betas: tuple) -> None:
    with pytest.raises(ConfigurationError, match=r"adam_betas=\[.*\]; expected two values in"):
        tiny_module(tiny_text_model, adam_betas=betas)


def test_an_unknown_optimizer_or_momentum_is_refused(tiny_text_model: str) -> None:
    with pytest.raises(ConfigurationError, match="optimizer='adam'; expected 'adamw' or 'sgd'"):
        tiny_module(tiny_text_model, optimizer="adam")
    with pytest.raises(ConfigurationError, match=r"momentum=1.0; expected a value in \[0, 1\)"):
        tiny_module(tiny_text_model, optimizer="sgd", momentum=1.0)


def test_a_non_finite_loss_outside_a_trainer_is_the_same_clear_error(
    module: AlignmentModule, batch: dict
) -> None:
    from adaptalign.common.errors import NonFiniteLossError

    assert module.attached_trainer() is None
    module.controls.loss_scale = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"Training stopped; no checkpoint had been"):
        module.training_step(batch, 0)


def test_non_finite_loss_stops_with_the_batch_and_controls(
    tiny_text_model: str, tmp_path: Path, cache_dir: Path
) -> None:
    """A NaN loss stops training before its backward pass; the last checkpoint stays good."""
    import lightning as L

    from adaptalign.common.errors import NonFiniteLossError
    from adaptalign.datamodules.datamodule import AlignmentDataModule
    from adaptalign.datamodules.generated import GeneratedConfig

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 2:
                pl_module.controls.loss_scale = float("nan")

    data = AlignmentDataModule(
        generated=GeneratedConfig(num_train=48, num_val=8, num_test=8, image_size=32),
        batch_size=8,
    )
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}"
    )
    trainer = quiet_trainer(
        max_epochs=1, enable_checkpointing=True, callbacks=[Poison(), checkpoints]
    )
    module = tiny_module(tiny_text_model)
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit(module, data)
    message = str(caught.value)
    assert "global step 2, batch 2" in message and "'loss_scale': nan" in message
    assert "image ids [" in message
    # the temperature in force (learned, unchanged by the failed step), not None; InfoNCE has no
    # margin to show
    in_force = f"{float(module.temperature):.4g}"
    assert in_force != "0.07" and f"'temperature': '{in_force} (model)'" in message
    assert "margin" not in message
    newest = tmp_path / "step=2.ckpt"
    assert message.endswith(f"the newest is {newest}.")
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["step=1.ckpt", "step=2.ckpt"]
    state = torch.load(tmp_path / "step=2.ckpt", weights_only=False)["state_dict"]
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    # The weights in memory are those of the last good step too: no NaN reached them.
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_a_non_finite_loss_before_any_checkpoint_says_none_was_written(
    tiny_text_model: str, cache_dir: Path
) -> None:
    """The message never points to a last good checkpoint that does not exist; a schedule's
    temperature and the max-margin criterion's own margin are the ones shown."""
    import lightning as L

    from adaptalign.common.errors import NonFiniteLossError
    from adaptalign.datamodules.datamodule import AlignmentDataModule
    from adaptalign.datamodules.generated import GeneratedConfig

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            pl_module.controls.temperature = 0.25
            pl_module.controls.loss_scale = float("inf")

    data = AlignmentDataModule(
        generated=GeneratedConfig(num_train=16, num_val=8, num_test=8, image_size=32),
        batch_size=8,
    )
    trainer = quiet_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[Poison()])
    module = tiny_module(tiny_text_model, criterion="max_margin", margin=0.3)
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit(module, data)
    message = str(caught.value)
    assert "global step 0, batch 0" in message
    assert "'temperature': 0.25" in message and "'margin': '0.3 (model)'" in message
    assert message.endswith("Training stopped; no checkpoint had been written yet.")
    assert "last good" not in message


def optimiser_lrs(module: AlignmentModule) -> dict[int, float]:
    """Each optimised parameter's learning rate, by identity."""
    optimizer = built_optimizer(module)
    return {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("unlocked", [2, "all"])
def test_a_decayed_tower_learning_rate_halves_with_each_block_or_layer_down(
    tiny_text_model_3_layers: str, unlocked: int | str
) -> None:
    m = AlignmentModule(
        image_tower={"model_name": "test_resnet", "unlocked_blocks": unlocked},
        text_tower={"model_name": tiny_text_model_3_layers, "unlocked_layers": unlocked},
        embed_dim=8,
        tower_lr=0.01,
        tower_lr_decay=0.5,
    )
    lrs = optimiser_lrs(m)
    # test_resnet: stem, layer1-4 (timm's blocks), no final norm; the tiny BERT: embeddings,
    # layers 0-2; what trains above them (BERT's pooler never reaches the embedding, kept fixed).
    image_depth = {"conv1": 5, "bn1": 5, "layer1": 4, "layer2": 3, "layer3": 2, "layer4": 1}
    seen = set()
    for name, p in m.image_tower.backbone.named_parameters():
        if p.requires_grad:
            depth = image_depth[name.split(".")[0]]
            assert lrs[id(p)] == pytest.approx(0.01 * 0.5**depth), name
            seen.add(depth)
    assert seen == ({1, 2} if unlocked == 2 else {1, 2, 3, 4, 5})
    seen = set()
    for name, p in m.text_tower.backbone.named_parameters():
        if p.requires_grad:
            layer = re.search(r"encoder\.layer\.(\d+)\.", name)
            depth = 3 - int(layer.group(1)) if layer else 4  # below the layers: the embeddings
            assert "embeddings" in name or layer, name
            assert lrs[id(p)] == pytest.approx(0.01 * 0.5**depth), name
            seen.add(depth)
    assert seen == ({1, 2} if unlocked == 2 else {1, 2, 3, 4})
    heads = [*m.image_tower.projection.parameters(), *m.text_tower.projection.parameters()]
    assert all(lrs[id(p)] == m.hparams.lr for p in heads)


def test_without_decay_every_tower_parameter_has_the_tower_learning_rate(
    tiny_text_model_3_layers: str,
) -> None:
    m = AlignmentModule(
        image_tower={"model_name": "test_resnet", "unlocked_blocks": 2},
        text_tower={"model_name": tiny_text_model_3_layers, "unlocked_layers": 2},
        embed_dim=8,
        tower_lr=0.01,
    )
    lrs = optimiser_lrs(m)
    backbones = [*m.image_tower.backbone.parameters(), *m.text_tower.backbone.parameters()]
    assert {lrs[id(p)] for p in backbones if p.requires_grad} == {0.01}


def test_a_decayed_image_tower_trains_its_head_layers_at_the_tower_rate(
    tiny_text_model: str,
) -> None:
    """timm's grouping leaves the final conv and norm out of the blocks: they are the top, at
    ``tower_lr``; the last block is one step down."""
    m = tiny_module(
        tiny_text_model,
        image={"model_name": "test_efficientnet", "unlocked_blocks": 1},
        text={"freeze": True},
        tower_lr=0.01,
        tower_lr_decay=0.5,
    )
    lrs = optimiser_lrs(m)
    trained = {
        name: lrs[id(p)] for name, p in m.image_tower.backbone.named_parameters() if p.requires_grad
    }
    assert {n.split(".")[0] for n in trained} == {"blocks", "conv_head", "bn2"}
    for name, lr in trained.items():
        assert lr == pytest.approx(0.005 if name.startswith("blocks.4.") else 0.01), name


def test_a_decay_with_frozen_towers_changes_nothing(tiny_text_model: str) -> None:
    frozen = {"freeze": True}
    decayed, plain = (
        optimiser_lrs(tiny_module(tiny_text_model, image=frozen, text=frozen, **decay))
        for decay in ({"tower_lr_decay": 0.5}, {})
    )
    assert sorted(decayed.values()) == sorted(plain.values())


def test_a_decay_for_a_text_model_without_layers_is_refused_when_built(
    tiny_text_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(text_split, "layer_stack", lambda hf_model: None)
    with pytest.raises(ConfigurationError, match="has no list of transformer layers"):
        tiny_module(tiny_text_model, image={"freeze": True}, tower_lr_decay=0.5)
    tiny_module(tiny_text_model, image={"freeze": True})  # without a decay it builds


@pytest.mark.parametrize("decay", [0, 1.5, -0.5])
def test_a_tower_lr_decay_outside_0_1_is_refused(tiny_text_model: str, decay: float) -> None:
    with pytest.raises(ConfigurationError, match=rf"tower_lr_decay={decay}; expected a factor in"):
        tiny_module(tiny_text_model, tower_lr_decay=decay)
