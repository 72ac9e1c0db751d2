"""Broken and missing images: every message names the data settings that find or skip them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from adaptalign.common.errors import DatasetFormatError
from adaptalign.datamodules.datasets import TrainPairs, default_transform
from adaptalign.datamodules.image_check import check_images
from tests.test_formats import broken_images, records_for


def test_undecodable_image_met_in_training_names_the_settings(tmp_path: Path) -> None:
    """Without verify_images a broken file surfaces when a batch needs it: say how to avoid it."""
    _, truncated, not_image = broken_images(tmp_path)
    pairs = TrainPairs([truncated, not_image], default_transform())
    for index, record in enumerate(pairs.records):
        with pytest.raises(DatasetFormatError) as info:
            pairs[index]
        message = str(info.value)
        assert message.startswith(f"{record.image_path}: cannot decode image (")
        assert message.endswith(
            "; expected a complete, readable image; data.verify_images: true checks every image "
            "before training and reports all broken ones, data.skip_bad_images: true then leaves "
            "them out"
        )


def test_verified_images_that_do_not_decode_name_the_skip_setting(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError) as info:
        check_images(broken_images(tmp_path), decode=True)
    message = str(info.value)
    assert message.endswith(
        "; expected complete, readable images (data.skip_bad_images: true leaves them out)"
    )
    assert "skip_bad=" not in message  # the function's argument is not a setting anyone can set


def test_missing_images_name_the_root_and_skip_settings(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetFormatError,
        match=re.escape("(check data.image_root; data.skip_bad_images: true leaves them out)"),
    ):
        check_images(records_for([tmp_path / "gone.jpg"]))
