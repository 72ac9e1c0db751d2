"""Shared fixtures: a tiny local text model and tiny generated data, so no test downloads anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = (
    "a an the and at in on of to with there is image showing shapes two three one small large "
    "big little tiny red green blue yellow purple orange white black pink cyan grey brown "
    "circle disc square box triangle star cross diamond ring hoop heart top bottom left right "
    "centre center middle side corner upper lower"
).split()


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1-layer, 32-dim BERT with a word-level vocabulary, saved as a plain transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Generated data goes to a per-test folder, never the user's cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("ADAPTALIGN_CACHE", str(path))
    return path
