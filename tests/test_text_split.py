"""The text model split into a frozen prefix and a trained suffix of its last layers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn

from adaptalign.common.errors import ConfigurationError
from adaptalign.encoders.text_models import load_text_model
from adaptalign.encoders.text_split import TextSplit, text_parameter_depths

CAPTIONS = [
    "a red circle",
    "a small red circle next to a large blue square",
    "two blue squares",
    "a large red circle on the left of a small blue square, a triangle",
]
LAYERS = ["0.model.embeddings", "0.model.encoder.layer.0", "0.model.encoder.layer.1"]


@pytest.fixture()
def model(tiny_text_model_3_layers: str) -> SentenceTransformer:
    """A fresh 3-layer tiny BERT with mean pooling, per test, since tests change its weights."""
    return load_text_model(tiny_text_model_3_layers, 64)


def whole(model: SentenceTransformer, tokens: dict[str, Tensor]) -> Tensor:
    """The sentence embedding of the whole model, the reference the split must reproduce."""
    return model(dict(tokens))["sentence_embedding"]


@pytest.mark.parametrize("unlocked", [1, 2, 3])
def test_suffix_over_prefix_is_the_whole_model(model: SentenceTransformer, unlocked: int) -> None:
    split = TextSplit(model, unlocked, name="tiny")
    assert (split.layer_count, split.unlocked_layers, split.hidden_size) == (3, unlocked, 32)
    assert split.boundary == f"layer {4 - unlocked} of 3"
    assert split.frozen_modules == tuple(LAYERS[: 4 - unlocked])
    model.eval()
    tokens = split.tokenize(CAPTIONS)
    assert (tokens["attention_mask"] == 0).any(), "the batch must hold padded rows"
    with torch.no_grad():
        hidden, mask = split.prefix(tokens)
        assert hidden.shape == (len(CAPTIONS), tokens["input_ids"].shape[1], 32)
        assert torch.equal(mask, tokens["attention_mask"])
        torch.testing.assert_close(split.suffix(hidden, mask), whole(model, tokens))


def test_prefix_stops_before_the_unlocked_layers(model: SentenceTransformer) -> None:
    split = TextSplit(model, 1)
    calls: list[str] = []
    last = model.get_submodule("0.model.encoder.layer.2")
    handle = last.register_forward_hook(lambda *_: calls.append("ran"))
    try:
        split.prefix(split.tokenize(CAPTIONS))
        assert calls == []
        whole(model, split.tokenize(CAPTIONS))  # the stopping hook is gone: the model runs through
        assert calls == ["ran"]
    finally:
        handle.remove()


def test_unlocked_parameters_are_the_last_layers_and_what_follows(
    tiny_text_model_3_layers: str,
) -> None:
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    base = load_text_model(tiny_text_model_3_layers, 64)
    model = SentenceTransformer(modules=[*base, Dense(32, 16), Normalize()], device="cpu")
    split = TextSplit(model, 2)
    names = {name for name, _ in model.named_parameters()}
    expected = {
        name
        for name in names
        if name.startswith(("0.model.encoder.layer.1.", "0.model.encoder.layer.2.", "2."))
    }
    assert any(name.startswith("2.") for name in expected), "the Dense module must train"
    assert split.unlocked_parameters == expected
    assert split.frozen_modules == tuple(LAYERS[:2])


def test_only_unlocked_parameters_get_gradients(model: SentenceTransformer) -> None:
    split = TextSplit(model, 2)
    tokens = split.tokenize(CAPTIONS)
    hidden, mask = split.prefix(tokens)
    split.suffix(hidden.detach(), mask).pow(2).sum().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == split.unlocked_parameters
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in with_grad)


def test_prefix_state_names_cover_what_the_prefix_depends_on(model: SentenceTransformer) -> None:
    split = TextSplit(model, 1)
    state = model.state_dict()
    assert "0.model.embeddings.word_embeddings.weight" in split.prefix_state_names
    assert any(key.startswith("0.model.encoder.layer.1.") for key in split.prefix_state_names)
    assert not any(key.startswith("0.model.encoder.layer.2.") for key in split.prefix_state_names)
    assert split.prefix_state_names <= set(state)
    assert not split.prefix_state_names & split.unlocked_parameters
    model.eval()
    tokens = split.tokenize(CAPTIONS)
    with torch.no_grad():
        before, _ = split.prefix(tokens)
        for key, value in state.items():  # everything else may change: the prefix does not move
            if key not in split.prefix_state_names and value.is_floating_point():
                value.add_(torch.randn_like(value))
        after, _ = split.prefix(tokens)
        assert torch.equal(before, after)
        model.get_parameter("0.model.encoder.layer.1.output.dense.weight").add_(1.0)
        assert not torch.allclose(split.prefix(tokens)[0], before)


def test_padding_does_not_change_a_caption_embedding(model: SentenceTransformer) -> None:
    """The data side caches each caption's prefix at one padding and batches it at another."""
    split = TextSplit(model, 2)
    model.eval()
    short = CAPTIONS[0]
    with torch.no_grad():
        alone, alone_mask = split.prefix(split.tokenize([short]))
        batch, batch_mask = split.prefix(split.tokenize(CAPTIONS))
        length = int(alone_mask.sum())
        assert batch.shape[1] > length
        torch.testing.assert_close(batch[0, :length], alone[0], atol=1e-5, rtol=1e-4)

        def padded(hidden: Tensor, mask: Tensor, width: int) -> tuple[Tensor, Tensor]:
            """Rows cut to their tokens and padded again to ``width`` with zeros, mask 0."""
            rows = torch.zeros(hidden.shape[0], width, hidden.shape[2])
            masks = torch.zeros(hidden.shape[0], width, dtype=mask.dtype)
            for i, row_mask in enumerate(mask):
                n = int(row_mask.sum())
                rows[i, :n], masks[i, :n] = hidden[i, :n], 1
            return rows, masks

        reference = split.suffix(alone, alone_mask)[0]
        wide = batch.shape[1] + 5
        rows, masks = padded(alone, alone_mask, wide)
        torch.testing.assert_close(split.suffix(rows, masks)[0], reference, atol=1e-5, rtol=0)
        rows, masks = padded(batch, batch_mask, wide)
        embeddings = split.suffix(rows, masks)
        torch.testing.assert_close(embeddings[0], reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            embeddings, whole(model, split.tokenize(CAPTIONS)), atol=1e-5, rtol=1e-4
        )


def test_construction_leaves_training_modes_as_they_were(model: SentenceTransformer) -> None:
    model.train()
    model.get_submodule("0.model.embeddings").eval()
    TextSplit(model, 1)
    assert model.training and model.get_submodule("0.model.encoder.layer.2").training
    assert not model.get_submodule("0.model.embeddings").training


@pytest.mark.parametrize("unlocked", [0, 4, -1, "all", 1.5, True])
def test_layer_counts_outside_the_stack_are_refused(
    model: SentenceTransformer, unlocked: object
) -> None:
    with pytest.raises(ConfigurationError) as error:
        TextSplit(model, unlocked, name="tiny-bert")  # type: ignore[arg-type]
    assert str(error.value) == (
        f"model.text_tower.unlocked_layers={unlocked!r}: tiny-bert has 3 transformer layers; "
        'expected 0..3 or "all"'
    )


def test_default_name_is_the_model_folder(model: SentenceTransformer) -> None:
    folder = model[0].auto_model.config.name_or_path
    with pytest.raises(ConfigurationError, match=f"{folder} has 3 transformer layers"):
        TextSplit(model, 9)


def test_a_model_without_a_layer_stack_is_refused(model: SentenceTransformer) -> None:
    model[0].auto_model.config.num_hidden_layers = 5  # no list of 5 layers to find
    with pytest.raises(ConfigurationError, match=r"unlocked_layers=1: tiny-bert .*no list of"):
        TextSplit(model, 1, name="tiny-bert")


def test_a_model_that_is_not_a_transformer_is_refused() -> None:
    class Averages(nn.Module):
        def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
            return features

    with pytest.raises(ConfigurationError, match="does not start with a transformers model"):
        TextSplit(SentenceTransformer(modules=[Averages()], device="cpu"), 1, name="averages")


def test_layers_that_need_more_than_a_mask_are_refused(
    tiny_text_model_3_layers: str, tmp_path: Path
) -> None:
    """MPNet's layers also take a position bias their encoder computes: running them alone
    differs, and the check at construction says so instead of training a different model."""
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    AutoTokenizer.from_pretrained(tiny_text_model_3_layers).save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=AutoTokenizer.from_pretrained(tiny_text_model_3_layers).vocab_size,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,
    )
    MPNetModel(config).save_pretrained(tmp_path)
    model = load_text_model(str(tmp_path), 64)
    with torch.no_grad():  # a bias as large as a trained model's, so the difference is plain
        nn.init.normal_(model[0].auto_model.encoder.relative_attention_bias.weight, std=2.0)
    with pytest.raises(ConfigurationError) as error:
        TextSplit(model, 1, name="tiny-mpnet")
    assert str(error.value).startswith(
        "model.text_tower.unlocked_layers=1: tiny-mpnet cannot be split at layer 3 of 3: "
        "its last 1 layers run alone differ from the whole model by up to "
    )


def test_layers_that_fail_alone_are_refused(model: SentenceTransformer) -> None:
    """A layer needing an input only its encoder passes fails in the suffix; that is a refusal."""

    class NeedsThird(nn.Module):
        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, hidden: Tensor, mask: Tensor, third: object, **kwargs: object) -> Tensor:
            return self.layer(hidden, mask, third, **kwargs)

    stack = model.get_submodule("0.model.encoder.layer")
    stack[2] = NeedsThird(stack[2])
    with pytest.raises(
        ConfigurationError, match=r"split at layer 3 of 3 \(encoder.layer\): TypeError"
    ):
        TextSplit(model, 1, name="tiny-bert")


class SharedTableModel(nn.Module):
    """A T5-like encoder: a shared token table registered before the layer list, a final norm
    after it."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2)
        self.shared = nn.Embedding(10, 4)
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.encoder.final_layer_norm = nn.LayerNorm(4)


def test_depths_put_what_comes_before_the_layers_below_them() -> None:
    transformer = nn.Module()
    transformer.auto_model = SharedTableModel()
    model = nn.Sequential(transformer, nn.Linear(4, 4))  # a dense layer on top, like a pooler
    depths = text_parameter_depths(model, "model.tower_lr_decay")
    assert depths == {
        "0.auto_model.shared.weight": 3,
        "0.auto_model.encoder.block.0.weight": 2,
        "0.auto_model.encoder.block.0.bias": 2,
        "0.auto_model.encoder.block.1.weight": 1,
        "0.auto_model.encoder.block.1.bias": 1,
        "0.auto_model.encoder.final_layer_norm.weight": 0,
        "0.auto_model.encoder.final_layer_norm.bias": 0,
        "1.weight": 0,
        "1.bias": 0,
    }
