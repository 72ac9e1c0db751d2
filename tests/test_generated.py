"""The generated dataset: determinism, caching, long tail, captions, hard negatives, read-back."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptalign.datamodules import generated
from adaptalign.datamodules.generated import (
    GeneratedConfig,
    config_key,
    default_cache_dir,
    generate_dataset,
    validate_config,
)
from adaptalign.datamodules.generated_drawing import BACKGROUND, render
from adaptalign.datamodules.generated_scenes import (
    COLOURS,
    SHAPES,
    SceneObject,
    category_ranking,
    sample_categories,
    zipf_probabilities,
)
from adaptalign.datamodules.karpathy import read_karpathy

TINY = GeneratedConfig(
    num_train=60, num_val=10, num_test=10, image_size=40, max_objects=4, hard_negative_rate=0.3
)


def folder_bytes(json_path: Path) -> dict[str, bytes]:
    """Every file of a generated entry, by path relative to the entry folder."""
    root = json_path.parent
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(TINY, tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="module")
def entries(tiny: Path) -> list[dict]:
    return json.loads(tiny.read_text())["images"]


# --- determinism and caching ------------------------------------------------------------------


def test_same_seed_gives_identical_files_and_another_seed_does_not(
    tiny: Path, tmp_path: Path
) -> None:
    again = generate_dataset(TINY, tmp_path / "a", progress=False)
    assert again != tiny
    first, second = folder_bytes(tiny), folder_bytes(again)
    assert len(first) == 1 + 80  # the JSON and one PNG per image
    assert first == second

    other = generate_dataset(replace(TINY, seed=1), tmp_path / "b", progress=False)
    third = folder_bytes(other)
    assert third["dataset_generated.json"] != first["dataset_generated.json"]
    differing = [name for name in first if name.endswith(".png") and first[name] != third[name]]
    assert len(differing) > 40


def test_output_location_follows_cache_dir_and_config(tmp_path: Path) -> None:
    path = generate_dataset(TINY, tmp_path, progress=False)
    assert path == tmp_path / "generated" / config_key(TINY) / "dataset_generated.json"
    assert (path.parent / "images" / "000079.png").is_file()
    assert not (path.parent / "images" / "000080.png").exists()
    # equal settings written with other number types share an entry; other settings do not
    assert config_key(GeneratedConfig(zipf_exponent=1, hard_negative_rate=0)) == config_key(
        GeneratedConfig(zipf_exponent=1.0, hard_negative_rate=0.0)
    )
    assert config_key(TINY) != config_key(replace(TINY, num_test=11))


def test_second_call_reuses_the_cache(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = generate_dataset(TINY, tmp_path, progress=False)
    image = path.parent / "images" / "000003.png"
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (path, image)]

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached dataset was generated again")

    monkeypatch.setattr(generated, "_write_dataset", fail)
    assert generate_dataset(TINY, tmp_path, progress=False) == path
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (path, image)] == before


def test_interrupted_run_leaves_no_entry_and_next_run_succeeds(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_render = generated.render
    calls = []

    def render_then_crash(*args: object, **kwargs: object) -> Image.Image:
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(generated, "render", render_then_crash)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(TINY, tmp_path, progress=False)
    assert list((tmp_path / "generated").iterdir()) == []

    monkeypatch.setattr(generated, "render", real_render)
    path = generate_dataset(TINY, tmp_path, progress=False)
    assert folder_bytes(path) == folder_bytes(tiny)


def test_leftovers_of_a_killed_run_do_not_break_the_next(tiny: Path, tmp_path: Path) -> None:
    parent = tmp_path / "generated"
    key = config_key(TINY)
    # a killed run's temporary folder, and an entry folder damaged from outside (no JSON)
    partial = parent / f".{key}.partial-killed"
    (partial / "images").mkdir(parents=True)
    (partial / "images" / "000000.png").write_bytes(b"not a png")
    (partial / "dataset_generated.json").write_text('{"images": [')
    damaged = parent / key / "images"
    damaged.mkdir(parents=True)
    (damaged / "000000.png").write_bytes(b"truncated")

    path = generate_dataset(TINY, tmp_path, progress=False)
    assert folder_bytes(path) == folder_bytes(tiny)
    assert len(read_karpathy(path)) == 80


# --- content ------------------------------------------------------------------------------------


def loglog_slope(exponent: float, seed: int) -> tuple[float, np.ndarray]:
    rng = np.random.default_rng(seed)
    ranking = category_ranking(rng)
    drawn = sample_categories(rng, 3000, ranking, exponent)
    rank_of = {category: rank for rank, category in enumerate(ranking)}
    counts = np.bincount([rank_of[c] for c in drawn], minlength=len(ranking))
    ranks = np.arange(1, len(ranking) + 1)
    seen = counts > 0
    return float(np.polyfit(np.log(ranks[seen]), np.log(counts[seen]), 1)[0]), counts


def test_zipf_probabilities_follow_the_power_law() -> None:
    # ranks 1..4 with s=1: weights 1, 1/2, 1/3, 1/4, total 25/12
    assert np.allclose(zipf_probabilities(4, 1.0), [12 / 25, 6 / 25, 4 / 25, 3 / 25])
    assert np.allclose(zipf_probabilities(5, 0.0), [0.2] * 5)


def test_category_frequencies_have_the_requested_long_tail() -> None:
    slope, counts = loglog_slope(1.1, seed=5)
    assert slope == pytest.approx(-1.1, abs=0.25)
    assert counts[:5].sum() > counts[-32:].sum()  # the head outweighs the whole tail half

    slope, counts = loglog_slope(0.0, seed=5)
    assert slope == pytest.approx(0.0, abs=0.25)
    assert counts.max() < 3 * counts.min()  # about 47 each when uniform


def test_categories_are_all_colour_shape_pairs_in_a_seeded_order() -> None:
    first = category_ranking(np.random.default_rng(0))
    assert len(first) == len(set(first)) == 64
    assert set(first) == {(c, s) for c in COLOURS for s in SHAPES}
    assert first == category_ranking(np.random.default_rng(0))
    assert first != category_ranking(np.random.default_rng(1))


def test_splits_ids_and_objects(entries: list[dict]) -> None:
    assert [e["split"] for e in entries] == ["train"] * 60 + ["val"] * 10 + ["test"] * 10
    assert [e["imgid"] for e in entries] == list(range(80))
    sentids = [s["sentid"] for e in entries for s in e["sentences"]]
    assert len(set(sentids)) == len(sentids) == 80 * 5
    counts = set()
    for e in entries:
        objects = e["objects"]
        counts.add(len(objects))
        assert 1 <= len(objects) <= 4
        assert len({o["position"] for o in objects}) == len(objects)
        for o in objects:
            assert o["shape"] in SHAPES and o["colour"] in COLOURS
            assert o["size"] in ("small", "large")
    assert counts == {1, 2, 3, 4}


def directions(position: str) -> set[str]:
    return set(position.split()) & {"top", "bottom", "left", "right"}


def test_every_caption_names_every_object(entries: list[dict]) -> None:
    for e in entries:
        captions = [s["raw"] for s in e["sentences"]]
        assert len(set(captions)) == 5
        for caption in captions:
            words = set(re.findall(r"[a-z]+", caption))
            for o in e["objects"]:
                shape = "|".join(SHAPES[o["shape"]])
                assert re.search(rf"\b{o['colour']} (?:{shape})\b", caption), (caption, o)
            assert words & set(COLOURS) == {o["colour"] for o in e["objects"]}
            wanted = set().union(*(directions(o["position"]) for o in e["objects"]))
            assert words & {"top", "bottom", "left", "right"} == wanted, (caption, e["objects"])
            if any(o["position"] == "centre" for o in e["objects"]):
                assert words & {"centre", "middle"}, caption


def test_hard_negatives_change_exactly_one_attribute(tiny: Path, entries: list[dict]) -> None:
    negatives = [e for e in entries if "hard_negative_of" in e]
    assert 13 <= len(negatives) <= 34  # rate 0.3 of 77 eligible images: 23 +- 4
    for e in negatives:
        source = entries[e["hard_negative_of"]]
        assert source["imgid"] < e["imgid"] and source["split"] == e["split"]
        assert len(source["objects"]) == len(e["objects"])
        changes = [
            (key, old[key], new[key])
            for old, new in zip(source["objects"], e["objects"], strict=True)
            for key in ("shape", "colour", "size", "position")
            if old[key] != new[key]
        ]
        assert len(changes) == 1 and changes[0][0] in ("colour", "position"), changes
        pixels = [
            np.asarray(Image.open(tiny.parent / "images" / x["filename"])) for x in (e, source)
        ]
        assert not np.array_equal(*pixels)


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_hard_negative_rate_extremes(rate: float, tmp_path: Path) -> None:
    config = GeneratedConfig(
        num_train=20, num_val=5, num_test=5, image_size=32, hard_negative_rate=rate
    )
    images = json.loads(generate_dataset(config, tmp_path, progress=False).read_text())["images"]
    negatives = [e["imgid"] for e in images if "hard_negative_of" in e]
    # at rate 1 every image is a near-copy except the first of each split, which has no source
    assert negatives == ([] if rate == 0 else [i for i in range(30) if i not in (0, 20, 25)])


def test_reads_back_as_records_with_images_and_objects(tiny: Path, entries: list[dict]) -> None:
    records = read_karpathy(tiny)
    assert len(records) == 80
    for record, e in zip(records, entries, strict=True):
        assert record.image_path.is_file()
        assert record.image_id == e["imgid"] and record.split == e["split"]
        assert len(record.captions) == 5
        shapes = [o["shape"] for o in e["objects"]]
        assert record.objects and set(record.objects) == set(shapes)
        assert len(record.objects) == len(set(shapes))
    with Image.open(records[7].image_path) as image:
        assert image.format == "PNG" and image.size == (40, 40) and image.mode == "RGB"


def test_render_draws_inside_the_objects_cell() -> None:
    image = np.asarray(render([SceneObject("blue", "circle", "large", "top left")], 60))
    assert image.shape == (60, 60, 3)
    assert tuple(image[10, 10]) == COLOURS["blue"]  # centre of the top-left 20-pixel cell
    assert (image[:, 20:] == BACKGROUND).all()
    assert (image[20:, :] == BACKGROUND).all()

    ring = np.asarray(render([SceneObject("red", "ring", "large", "centre")], 60))
    assert tuple(ring[30, 30]) == BACKGROUND  # a ring is hollow
    assert (ring == COLOURS["red"]).all(axis=-1).any()


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_train", 0),
        ("num_val", -1),
        ("num_test", 2.5),
        ("image_size", 31),
        ("max_objects", 0),
        ("max_objects", 5),
        ("zipf_exponent", -0.1),
        ("hard_negative_rate", 1.5),
        ("captions_per_image", 0),
        ("seed", -1),
    ],
)
def test_bad_settings_are_rejected_before_writing(
    field: str, value: object, tmp_path: Path
) -> None:
    config = replace(TINY, **{field: value})
    with pytest.raises(ValueError, match=rf"{field}={re.escape(repr(value))}; expected"):
        generate_dataset(config, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_boundary_settings_are_accepted() -> None:
    validate_config(
        GeneratedConfig(
            image_size=32,
            max_objects=4,
            zipf_exponent=0.0,
            hard_negative_rate=1.0,
            captions_per_image=1,
        )
    )
    validate_config(GeneratedConfig(max_objects=1, hard_negative_rate=0.0))


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADAPTALIGN_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("ADAPTALIGN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "adaptalign"
