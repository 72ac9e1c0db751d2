"""Shared fixtures: a tiny local text model and a per-test cache, so no test downloads anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def caption_words(scenes: int = 400) -> list[str]:
    """Every word the generated dataset's grammar produces, so the tiny tokenizer knows them."""
    import numpy as np

    from adaptalign.datamodules import generated_scenes as g

    rng = np.random.default_rng(0)
    ranking = g.category_ranking(rng)
    words: set[str] = set()
    for _ in range(scenes):
        for caption in g.make_captions(rng, g.sample_scene(rng, 3, ranking, 0.0), 5):
            words.update(caption.replace(",", " ").replace(":", " ").split())
    return sorted(words)


def save_tiny_bert(folder: Path, layers: int) -> str:
    """A 32-dim BERT of ``layers`` layers with a word-level vocabulary, as a transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ":", *caption_words()]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    try:  # transformers >= 5 takes the vocabulary itself, 4.x a file
        tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    except TypeError:
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    ids = tokenizer("a red circle")["input_ids"]
    assert vocab.index("[UNK]") not in ids, "the tiny tokenizer must know the caption words"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1-layer, 32-dim BERT with a word-level vocabulary, saved as a plain transformers folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=1)


@pytest.fixture(scope="session")
def tiny_text_model_3_layers(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny BERT with 3 layers, so a split can leave layers on both sides of its cut."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-3"), layers=3)


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Generated data goes to a per-test folder, never the user's cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("ADAPTALIGN_CACHE", str(path))
    return path


@pytest.fixture(autouse=True)
def torch_threads_kept() -> object:
    """Each test leaves torch's thread count as it found it: a benchmark's main run in a test
    sets it for the whole process, and a test that later compares an in-process run with a
    subprocess's bit for bit would then sum in another order."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts several processes is slow too, so ``-m "not slow"`` leaves it out."""
    for item in items:
        if item.get_closest_marker("ddp") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def allocator_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that runs a command in this process does not change the process's malloc for the
    tests after it (which cannot be undone) or export its settings to their subprocesses;
    ``tests/test_allocator.py`` runs the real one where it checks it."""
    from adaptalign import cli

    monkeypatch.setattr(cli, "keep_freed_memory", lambda: [])
