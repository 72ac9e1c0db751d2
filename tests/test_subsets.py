"""Low-data subsets and training sampling."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.datamodules.records import Record
from adaptalign.datamodules.subsets import cap_captions, nested_subset, subset_size


def records(n: int) -> list[Record]:
    return [
        Record(Path(f"/x/{i}.jpg"), tuple(f"caption {i}.{k}" for k in range(5)), i, "train")
        for i in range(n)
    ]


def ids(subset: list[Record]) -> set[int]:
    return {r.image_id for r in subset}


def test_subsets_are_nested_for_one_seed_and_differ_across_seeds() -> None:
    pool = records(100)
    small, large = nested_subset(pool, 10, seed=3), nested_subset(pool, 40, seed=3)
    assert len(small) == 10 and len(large) == 40
    assert ids(small) < ids(large)
    assert ids(nested_subset(pool, 10, seed=3)) == ids(small)  # deterministic
    assert ids(nested_subset(pool, 10, seed=4)) != ids(small)
    assert [r.image_id for r in large] == sorted(ids(large))  # file order kept


def test_fraction_and_full_split() -> None:
    assert subset_size(0.25, 100) == 25
    assert subset_size(None, 100) == 100
    assert subset_size(1.0, 100) == 100
    assert len(nested_subset(records(100), 0.1, seed=0)) == 10


def test_a_whole_count_written_as_a_float_is_a_count() -> None:
    """``1000.0`` in a YAML file, or ``1000`` read as a float by a parser whose union types a
    library reordered (Ray Tune's ``Union[float, int]``), still means 1000 images."""
    assert subset_size(40.0, 100) == subset_size(40, 100) == 40
    with pytest.raises(ConfigurationError, match="train_images=101 but the train split has only"):
        subset_size(101.0, 100)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (101, r"train_images=101 but the train split has only 100 images"),
        (0, r"train_images=0; expected a count >= 1"),
        (1.5, r"a fraction must lie in \(0, 1\]"),
        (True, r"expected a count or a fraction"),
    ],
)
def test_bad_subset_sizes(size: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        subset_size(size, 100)  # type: ignore[arg-type]


def test_caption_cap_keeps_the_first_captions() -> None:
    capped = cap_captions(records(3), 2)
    assert [r.captions for r in capped][1] == ("caption 1.0", "caption 1.1")
    with pytest.raises(ConfigurationError, match="captions_per_image=0"):
        cap_captions(records(3), 0)


def test_data_module_subset_cap_and_one_caption_per_image_per_batch(tmp_path: Path) -> None:
    data = AlignmentDataModule(
        generated=GeneratedConfig(num_train=40, num_val=8, num_test=8, image_size=32),
        cache_dir=str(tmp_path),
        train_images=24,
        captions_per_image=3,
        batch_size=8,
        seed=1,
    )
    data.setup()
    train = data.splits["train"]
    assert len(train) == 24 and all(len(r.captions) == 3 for r in train)
    assert all(len(r.captions) == 5 for r in data.splits["val"])  # evaluation keeps every caption
    loader = data.train_dataloader()
    seen_captions: dict[int, set[int]] = {}
    for epoch in range(6):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 3
        for batch in batches:
            image_ids = batch["image_id"].tolist()
            assert len(set(image_ids)) == len(image_ids)  # never two captions of one image
            for image_id, caption in zip(image_ids, batch["caption_index"].tolist(), strict=True):
                assert 0 <= caption < 3
                seen_captions.setdefault(image_id, set()).add(caption)
    assert set(seen_captions) == ids(train)  # every subset image is drawn each epoch
    # over epochs, images are paired with different captions
    assert sum(len(c) > 1 for c in seen_captions.values()) > len(train) // 2


def test_a_split_with_no_images_is_named(tmp_path: Path) -> None:
    """A Karpathy file without test images: asking for the test split names the file and split."""
    import json

    from PIL import Image

    from adaptalign.common.errors import DatasetFormatError

    images = []
    for i, split in enumerate(["train", "train", "val"]):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        images.append({"filename": f"{i}.png", "split": split, "sentences": [{"raw": f"c {i}"}]})
    annotations = tmp_path / "dataset_tiny.json"
    annotations.write_text(json.dumps({"images": images}))
    data = AlignmentDataModule(annotations=str(annotations), batch_size=2)
    data.setup()
    assert len(data.splits["train"]) == 2 and data.splits["test"] == []
    with pytest.raises(DatasetFormatError, match=r"split 'test' of .*dataset_tiny\.json has no"):
        data.test_dataloader()
