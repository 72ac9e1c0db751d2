"""Cached frozen prefixes: ragged and half-precision rows, the size check, keys, and training from
the cache exactly as from recomputed prefixes (loss and gradients), also resumed and under DDP."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from adaptalign.callbacks.model_inputs import model_inputs
from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules import feature_cache
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.datasets import text_features
from adaptalign.datamodules.feature_cache import FeatureCache
from adaptalign.datamodules.frozen_features import image_model_key, text_prefix_key
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.datamodules.noise import NoiseConfig
from adaptalign.lightning_modules.system import AlignmentModule
from tests.helpers.builders import quiet_trainer, tiny_module
from tests.helpers.command_line import run_adaptalign

TINY = Path(__file__).parent / "configs" / "tiny.yaml"

# fp16 keeps 11 significant bits: a stored prefix value is off by at most 2^-11 of itself. Through
# the unlocked top and the head this moved the tiny system's loss by 6e-6 and each parameter's
# gradient by at most 9e-4 of its largest entry; the tolerance leaves a margin of 5.
HALF_RTOL = 5e-3


# --------------------------------------------------------------------------- storage


def _ragged(lengths: list[int], width: int = 4) -> list[torch.Tensor]:
    return [torch.randn(n, width) for n in lengths]


def test_ragged_rows_come_back_unpadded_and_in_order(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    rows = _ragged([3, 1, 5, 2])
    keys = ["a", "b", "c", "d"]

    def compute(positions: list[int]):
        for i in positions:
            yield [i], [rows[i]]

    out = cache.rows("text_prefix", "m", keys, compute, chunk_rows=3)
    assert [r.shape[0] for r in out] == [3, 1, 5, 2]
    assert all(torch.equal(a, b) for a, b in zip(out, rows, strict=True))
    assert len(cache.chunks("text_prefix", "m")) == 2  # 3 rows, then 1

    # Read back from disk, a repeat and a new order
    again = cache.rows("text_prefix", "m", ["d", "a", "d"], compute, chunk_rows=3)
    assert [r.shape[0] for r in again] == [2, 3, 2]
    assert torch.equal(again[0], rows[3]) and torch.equal(again[1], rows[0])


def test_half_storage_rounds_to_float16_and_keeps_out_of_range_chunks_in_float32(
    tmp_path: Path,
) -> None:
    cache = FeatureCache(tmp_path)
    small = torch.randn(4, 3)
    huge = torch.full((2, 3), 1e6)
    keys = ["a", "b", "c", "d", "e", "f"]
    table = torch.cat([small, huge])

    def compute(positions: list[int]):
        yield positions, table[positions]

    out = cache.rows("image", "m", keys[:4], compute, chunk_rows=8, half=True)
    assert out.dtype == torch.float16
    assert torch.equal(out, small.half())
    assert (out.float() - small).abs().max() <= small.abs().max() * 2**-11

    out = cache.rows("image", "m", keys, compute, chunk_rows=8, half=True)
    assert out.dtype == torch.float32  # the chunk of 1e6 values stays float32 and promotes
    assert torch.equal(out[4:], huge) and torch.equal(out[:4], small.half().float())


def test_a_cache_the_disk_cannot_hold_is_refused_before_anything_is_computed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Usage(NamedTuple):
        total: int
        used: int
        free: int

    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda _: Usage(10**9, 0, 1000))
    computed: list[int] = []

    def compute(positions: list[int]):
        computed.extend(positions)
        yield positions, torch.zeros(len(positions), 1000)

    def bar(missing: list[int], wanted: int):
        feature_cache.check_space(
            tmp_path, 4000 * len(missing), "image prefix", "model.image_tower.unlocked_blocks"
        )

    with pytest.raises(ConfigurationError) as error:
        FeatureCache(tmp_path).rows("image", "m", ["a", "b"], compute, 8, bar)
    assert computed == []
    message = str(error.value)
    assert "8.0 kB" in message and "1.0 kB free" in message
    assert "model.image_tower.unlocked_blocks" in message and "data.cache_dir" in message


def test_ragged_caption_rows_are_padded_with_a_mask() -> None:
    rows = _ragged([2, 4])
    batch = text_features(rows)
    assert batch["text_features"].shape == (2, 4, 4)
    assert batch["text_features_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert torch.equal(batch["text_features"][0, :2], rows[0])
    assert not batch["text_features"][0, 2:].any()
    assert text_features([torch.ones(3), torch.zeros(3)])["text_features"].shape == (2, 3)


# --------------------------------------------------------------------------- towers


def split_module(text_model: str, seed: int = 0, **settings: object) -> AlignmentModule:
    """The tiny system with its last image stage and its one text layer trained."""
    return tiny_module(
        text_model,
        seed=seed,
        image={"unlocked_blocks": 1},
        text={"unlocked_layers": 1},
        **settings,
    )


def _data(root: Path, cached: bool, **settings: object) -> AlignmentDataModule:
    return AlignmentDataModule(
        generated=GeneratedConfig(num_train=16, num_val=4, num_test=4, image_size=32),
        cache_dir=str(root),
        batch_size=8,
        feature_cache=cached,
        **settings,
    )


def _first_batch(module: AlignmentModule, data: AlignmentDataModule) -> dict:
    data.model_inputs = model_inputs(module)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _loss_and_gradients(module: AlignmentModule, batch: dict) -> tuple[float, dict]:
    """The training loss of ``batch`` and the gradient of every parameter that gets one.

    Evaluation mode (dropout off) so both paths compute the same function; autograd stays on.
    """
    module.eval()
    module.zero_grad()
    loss = module.training_step(batch, 0)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.slow
def test_the_cached_prefix_gives_the_loss_and_gradients_of_the_recomputed_one(
    tiny_text_model: str, tmp_path: Path
) -> None:
    module = split_module(tiny_text_model)
    cached = _first_batch(module, _data(tmp_path, cached=True))
    raw = _first_batch(module, _data(tmp_path, cached=False))
    assert torch.equal(cached["image_id"], raw["image_id"])
    assert cached["image_features"].dtype == torch.float16
    assert cached["image_features"].shape[1:] == module.image_tower.cached_shape
    assert cached["text_features"].dim() == 3 and "images" not in cached

    loss_cached, grads_cached = _loss_and_gradients(module, cached)
    loss_raw, grads_raw = _loss_and_gradients(module, raw)
    assert loss_cached == pytest.approx(loss_raw, rel=HALF_RTOL)
    assert grads_cached.keys() == grads_raw.keys()
    for name, grad in grads_raw.items():
        scale = grad.abs().max().clamp_min(1e-8)
        assert (grads_cached[name] - grad).abs().max() <= HALF_RTOL * scale, name


def test_only_the_unlocked_top_and_the_heads_get_gradients(
    tiny_text_model: str, tmp_path: Path
) -> None:
    module = split_module(tiny_text_model)
    _, grads = _loss_and_gradients(module, _first_batch(module, _data(tmp_path, cached=True)))
    image, text = module.image_tower, module.text_tower
    for tower, prefix in (("image_tower", image), ("text_tower", text)):
        trained = {f"{tower}.backbone.{n}" for n in prefix.split.unlocked_parameters}
        backbone = {n for n in grads if n.startswith(f"{tower}.backbone.")}
        assert backbone and backbone <= trained, tower
    locked = [
        n for n, p in image.backbone.named_parameters() if n not in image.split.unlocked_parameters
    ]
    assert locked and all(not image.backbone.get_parameter(n).requires_grad for n in locked)
    assert any(n.startswith("image_tower.projection") for n in grads)
    assert any(n.startswith("text_tower.projection") for n in grads)

    # The frozen prefix stays in evaluation mode while the top trains.
    module.train()
    for name in image.split.frozen_modules:
        assert not image.backbone.get_submodule(name).training, name
    for name in text.split.frozen_modules:
        assert not text.backbone.get_submodule(name).training, name
    assert image.backbone.get_submodule(image.split.boundary).training


def test_cache_keys_follow_the_frozen_weights_and_the_cut_but_not_the_trained_top(
    tiny_text_model: str,
) -> None:
    def keys(module: AlignmentModule) -> tuple[str, str]:
        transform = module.image_transform()
        return image_model_key(module.image_tower, transform), text_prefix_key(module.text_tower)

    base = keys(split_module(tiny_text_model))
    assert keys(split_module(tiny_text_model)) == base
    image_other, _ = keys(split_module(tiny_text_model, seed=1))
    assert image_other != base[0]  # other random image weights; the text model is loaded
    deeper = tiny_module(tiny_text_model, image={"unlocked_blocks": 2}, text={"unlocked_layers": 1})
    assert keys(deeper)[0] != base[0]

    trained = split_module(tiny_text_model)
    with torch.no_grad():
        for name, p in trained.image_tower.backbone.named_parameters():
            if name in trained.image_tower.split.unlocked_parameters:
                p.add_(1.0)
        for name, p in trained.text_tower.backbone.named_parameters():
            if name in trained.text_tower.split.unlocked_parameters:
                p.add_(1.0)
    assert keys(trained) == base  # a resumed run finds its prefixes again
    with torch.no_grad():
        next(trained.text_tower.backbone.parameters()).add_(1.0)  # the embeddings: the prefix
    assert keys(trained)[1] != base[1]

    frozen = tiny_module(tiny_text_model, image={"freeze": True})
    assert image_model_key(frozen.image_tower, frozen.image_transform()) != base[0]


@pytest.mark.parametrize(
    ("image", "text", "message"),
    [
        ({"unlocked_blocks": 9}, {}, "model.image_tower.unlocked_blocks=9"),
        ({"unlocked_blocks": -1}, {}, "model.image_tower.unlocked_blocks=-1"),
        ({"unlocked_blocks": "top"}, {}, "model.image_tower.unlocked_blocks='top'"),
        ({"unlocked_blocks": 1, "freeze": True}, {}, "model.image_tower.freeze=true"),
        ({}, {"unlocked_layers": 2}, "model.text_tower.unlocked_layers=2"),
        ({}, {"unlocked_layers": 1, "freeze": True}, "model.text_tower.freeze=true"),
    ],
)
def test_bad_unlock_settings_are_refused(
    image: dict, text: dict, message: str, tiny_text_model: str
) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(")):
        tiny_module(tiny_text_model, image=image, text=text)


def test_zero_is_frozen_and_all_is_full_training(tiny_text_model: str) -> None:
    module = tiny_module(
        tiny_text_model,
        image={"unlocked_blocks": 0},
        text={"unlocked_layers": "all"},
    )
    assert module.image_tower.frozen and module.image_tower.split is None
    assert not module.text_tower.frozen and module.text_tower.split is None
    inputs = model_inputs(module)
    assert inputs.image_tower is module.image_tower and inputs.text_prefix is None


@pytest.mark.slow
def test_noisy_items_get_their_own_cached_prefixes(tiny_text_model: str, tmp_path: Path) -> None:
    module = split_module(tiny_text_model)
    noise = NoiseConfig(caption_rate=0.5, image_rate=0.5)
    clean = _data(tmp_path, cached=True)
    clean.model_inputs = model_inputs(module)
    clean.setup("fit")
    noisy = _data(tmp_path, cached=True, eval_noise=noise)
    noisy.model_inputs = model_inputs(module)
    noisy.setup("fit")
    clean_batch, noisy_batch = (
        next(iter(clean.val_dataloader())),
        next(iter(noisy.val_dataloader())),
    )
    assert torch.equal(clean_batch["image_id"], noisy_batch["image_id"])
    assert not torch.equal(clean_batch["image_features"], noisy_batch["image_features"])
    assert clean_batch["texts"] != noisy_batch["texts"]

    # Each noisy row is the prefix of the noisy input, read back from the cache on a second pass.
    raw = _data(tmp_path, cached=False, eval_noise=noise)
    raw.model_inputs = model_inputs(module)
    raw.setup("fit")
    images = next(iter(raw.val_dataloader()))["images"]
    module.eval()
    direct = module.image_tower.frozen_features(images)
    assert torch.allclose(noisy_batch["image_features"].float(), direct, rtol=2e-3, atol=1e-3)
    again = _data(tmp_path, cached=True, eval_noise=noise)
    again.model_inputs = model_inputs(module)
    again.setup("fit")
    assert torch.equal(
        next(iter(again.val_dataloader()))["image_features"], noisy_batch["image_features"]
    )


@pytest.mark.slow
def test_augmented_training_images_recompute_the_prefix_and_evaluation_reads_the_cache(
    tiny_text_model: str, tmp_path: Path
) -> None:
    module = tiny_module(
        tiny_text_model, image={"unlocked_blocks": 1, "augment": True}, text={"freeze": True}
    )
    data = _data(tmp_path, cached=True)
    with pytest.warns(UserWarning, match=r"augment=true: .* frozen prefix \(below layer4\)"):
        quiet_trainer(max_epochs=1, default_root_dir=tmp_path).fit(module, data)
    train = next(iter(data.train_dataloader()))
    assert "images" in train and "image_features" not in train and "text_features" in train
    assert "image_features" in next(iter(data.val_dataloader()))
    # Augmentation is random: the same image comes out differently on another draw.
    dataset = data.train_dataloader().dataset
    assert not torch.equal(dataset[0]["images"], dataset[0]["images"])


@pytest.mark.ddp
def test_ddp_and_bf16_train_the_top_over_prefixes_one_process_extracted(
    tiny_text_model: str, tmp_path: Path
) -> None:
    """`adaptalign fit` on 2 CPU processes in bf16: one process fills the prefix cache, both
    train from it, and between epochs only the unlocked top and the heads change."""
    result = run_adaptalign(
        [
            "fit",
            "--config",
            str(TINY),
            f"--model.text_tower.model_name={tiny_text_model}",
            "--model.image_tower.unlocked_blocks=1",
            "--model.text_tower.unlocked_layers=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.precision=bf16-mixed",
            "--trainer.max_epochs=2",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'epochs'}",
            "--trainer.callbacks.every_n_train_steps=1",  # 1 step an epoch on 2 processes
            "--trainer.callbacks.save_top_k=-1",
        ],
        tmp_path / "cache",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if "to compute" in line]
    assert sum("image prefix below layer4" in line for line in said) == 2  # train, val: once each
    assert sum("text prefix below layer 1 of 1" in line for line in said) == 2
    assert list((tmp_path / "cache" / "features" / "text_prefix").rglob("chunk-*.pt"))

    first, second = (
        torch.load(path, weights_only=False)["state_dict"]
        for path in sorted((tmp_path / "epochs").glob("epoch=*.ckpt"))
    )
    module = tiny_module(tiny_text_model, image={"unlocked_blocks": 1}, text={"unlocked_layers": 1})
    unlocked = {
        f"{tower}.backbone.{name}"
        for tower in ("image_tower", "text_tower")
        for name in getattr(module, tower).split.unlocked_parameters
    }
    changed = {k for k in second if not torch.equal(first[k], second[k])}
    assert changed, "nothing trained"
    for key in changed:
        assert (
            key in unlocked
            or ".projection." in key
            or key == "log_scale"
            or (
                key.startswith("image_tower.backbone.layer4.")  # running statistics of the top
            )
        ), key
    assert any(key in unlocked for key in changed)


def test_filling_the_cache_draws_nothing_from_the_global_generator(
    tiny_text_model: str, tmp_path: Path
) -> None:
    """Else a run that fills the cache would draw its dropout differently from one reading it."""
    module = split_module(tiny_text_model)
    data = _data(tmp_path, cached=True)
    data.model_inputs = model_inputs(module)
    data.setup("fit")
    before = torch.get_rng_state()
    data.train_dataloader()  # extracts the training split's prefixes
    assert list((tmp_path / "features" / "image").rglob("chunk-*.pt"))
    assert torch.equal(torch.get_rng_state(), before)


def test_cached_caption_rows_go_through_the_top_in_length_sorted_chunks(
    tiny_text_model: str,
) -> None:
    """Chunks of similar lengths, each cut to its longest row, give each caption's embedding in
    its place, as one padded forward does."""
    captions = ["a red circle", "a blue star left of a green square", "a star", "red", "a circle"]
    whole = tiny_module(tiny_text_model, text={"unlocked_layers": 1, "chunk_size": None})
    chunked = tiny_module(tiny_text_model, text={"unlocked_layers": 1, "chunk_size": 2})
    chunked.load_state_dict(whole.state_dict())
    rows = [whole.text_tower.frozen_hidden([c])[0][0] for c in captions]
    batch = text_features(rows)
    whole.eval()
    chunked.eval()
    with torch.no_grad():
        expected = whole.text_tower.from_cached(batch["text_features"], batch["text_features_mask"])
        got = chunked.text_tower.from_cached(batch["text_features"], batch["text_features_mask"])
    assert len({row.shape[0] for row in rows}) > 2
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # distinct rows, each in its place
