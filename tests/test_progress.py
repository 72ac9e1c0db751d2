"""Progress of one-time work: tqdm on a terminal, plain lines anywhere else, what it is doing."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from tqdm import tqdm

from adaptalign.common.progress import ProgressLines, progress_bar
from adaptalign.datamodules.feature_cache import FeatureCache
from adaptalign.datamodules.frozen_features import caption_features
from adaptalign.datamodules.generated import GeneratedConfig, generate_dataset
from adaptalign.encoders.text_models import load_text_model
from tests.helpers.captions import some_captions


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_every_interval_and_at_the_end() -> None:
    now = [0.0]
    out = io.StringIO()
    bar = ProgressLines(100, "image features", "image", out, interval=30.0, clock=lambda: now[0])
    now[0] = 10.0
    bar.update(20)  # within the interval: quiet
    now[0] = 40.0
    bar.update(20)  # 40 of 100 after 40 s: 60 s to go at that pace
    now[0] = 50.0
    bar.update(60)
    bar.close()
    bar.close()  # once only
    assert out.getvalue().splitlines() == [
        "image features: 40/100 images (40%), 00:40 elapsed, about 01:00 left",
        "image features: 100/100 images (100%), 00:50 elapsed",
    ]


def test_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    assert isinstance(progress_bar(3, "x", "item", stream=Terminal()), tqdm)
    lines = progress_bar(3, "x", "item", stream=io.StringIO())
    assert isinstance(lines, ProgressLines)
    silent = io.StringIO()
    with progress_bar(3, "x", "item", enabled=False, stream=silent) as bar:
        bar.update(3)
    assert silent.getvalue() == ""


def test_generating_data_says_what_it_does(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = GeneratedConfig(num_train=6, num_val=2, num_test=2, image_size=32)
    generate_dataset(config, tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("generating the dataset (10 images) into ")
    assert err[0].endswith("; later runs reuse it")
    assert err[-1].startswith("generating dataset: 10/10 images (100%)")
    generate_dataset(config, tmp_path)
    assert capsys.readouterr().err == ""  # cached: nothing to do, nothing said


def test_feature_extraction_says_what_it_does(
    tiny_text_model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    backbone = load_text_model(tiny_text_model, 64)
    cache = FeatureCache(tmp_path)
    caption_features(backbone, some_captions(10), cache, progress=True)
    capsys.readouterr()
    caption_features(backbone, some_captions(12), cache, progress=True)
    err = capsys.readouterr().err.splitlines()
    folder = cache.folder("text", "")
    # 2 captions x 32 float32 values: the size is said before anything is computed
    assert err[0].startswith(
        f"text features: 2 of 12 captions to compute, 256 B (10 cached, stored in {folder}"
    )
    assert "an interrupted run resumes where it stopped" in err[0]
    assert err[-1].startswith("text features: 2/2 captions (100%)")
