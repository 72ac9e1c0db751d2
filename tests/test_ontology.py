"""Object tags from captions: synonyms, plurals, multi-word names, vocabulary files, policies."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.ontology import Ontology, OntologyConfig, format_summary
from adaptalign.datamodules.records import Record
from adaptalign.datamodules.vocabulary import builtin_vocabularies, plural, words

VOCABULARY = {
    "dog": ["dog", "puppy"],
    "hot dog": ["hot dog", "hotdog"],
    "teddy bear": ["teddy bear"],
    "bear": ["bear", "polar bear"],
    "man": ["man", "guy"],
    "child": ["child", "kid"],
    "shirt": ["shirt", "t-shirt"],
    "ball": ["ball"],
    "bus": ["bus"],
    "knife": ["knife"],
    "sheep": ["sheep"],
    "berry": ["berry"],
    "box": ["box"],
}


def ontology(**config: object) -> Ontology:
    return Ontology(VOCABULARY, OntologyConfig(**config))  # type: ignore[arg-type]


def record(image_id: int, *captions: str, objects: tuple[str, ...] = ()) -> Record:
    return Record(Path(f"/data/{image_id}.jpg"), captions, image_id, "train", objects)


def write(tmp_path: Path, content: object) -> str:
    path = tmp_path / "vocabulary.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize(
    ("singular", "expected"),
    [
        ("dog", "dogs"),
        ("bus", "buses"),
        ("glass", "glasses"),
        ("box", "boxes"),
        ("bench", "benches"),
        ("brush", "brushes"),
        ("berry", "berries"),
        ("boy", "boys"),
        ("knife", "knives"),
        ("leaf", "leaves"),
        ("giraffe", "giraffes"),
        ("potato", "potatoes"),
        ("piano", "pianos"),
        ("man", "men"),
        ("woman", "women"),
        ("fireman", "firemen"),
        ("human", "humans"),
        ("child", "children"),
        ("person", "people"),
        ("mouse", "mice"),
        ("foot", "feet"),
        ("tooth", "teeth"),
        ("goose", "geese"),
        ("sheep", "sheep"),
        ("fish", "fish"),
        ("deer", "deer"),
        ("scissors", "scissors"),
        ("skis", "skis"),
    ],
)
def test_plural_rules(singular: str, expected: str) -> None:
    assert plural(singular) == expected


def test_words_split_on_everything_but_letters() -> None:
    assert words("A Man's T-shirt, 2 dogs!") == ("a", "man", "s", "t", "shirt", "dogs")


def test_synonyms_case_and_punctuation() -> None:
    o = ontology()
    assert o.tag_caption("A PUPPY!") == ("dog",)
    assert o.tag_caption("the guy's dog") == ("man", "dog")
    assert o.tag_caption("(kid), bear.") == ("child", "bear")
    assert o.tag_caption("nothing known here") == ()


def test_plurals_regular_and_irregular() -> None:
    o = ontology()
    assert o.tag_caption("two puppies and three buses") == ("dog", "bus")
    assert o.tag_caption("Men with knives") == ("man", "knife")
    assert o.tag_caption("children among sheep") == ("child", "sheep")
    assert o.tag_caption("berries in boxes") == ("berry", "box")


def test_multi_word_and_longest_match() -> None:
    o = ontology()
    assert o.tag_caption("a hot dog") == ("hot dog",)  # not also a dog
    assert o.tag_caption("hot dogs and a dog") == ("hot dog", "dog")
    assert o.tag_caption("a teddy bear next to a polar bear") == ("teddy bear", "bear")
    assert o.tag_caption("hotdog") == ("hot dog",)


def test_hyphens_separate_words_in_captions_and_vocabulary() -> None:
    o = ontology()
    assert o.tag_caption("a T-shirt") == ("shirt",)
    assert o.tag_caption("a t shirt") == ("shirt",)
    assert o.tag_caption("two t-shirts") == ("shirt",)
    assert o.tag_caption("a hot-dog stand") == ("hot dog",)


def test_tags_are_distinct_in_order_of_first_mention() -> None:
    assert ontology().tag_caption("a ball, a dog, another ball and a guy") == ("ball", "dog", "man")


def test_record_tags_rank_by_captions_then_first_mention() -> None:
    o = ontology()
    r = record(
        1,
        "a guy throws a ball to a dog",
        "a dog catches a ball",
        "a puppy running",
    )
    # dog in 3 captions, ball in 2, man in 1; ties would go by first mention
    assert o.tag_record(r) == ("dog", "ball", "man")
    tie = record(2, "a ball and a dog", "a dog and a ball")
    assert o.tag_record(tie) == ("ball", "dog")


def test_dataset_objects_are_kept_unless_disabled() -> None:
    r = record(1, "a dog", objects=("circle", "star"))
    assert ontology().tag_record(r) == ("circle", "star")
    assert ontology(use_dataset_objects=False).tag_record(r) == ("dog",)


def test_image_tags_intersect_and_fall_back() -> None:
    o = ontology()
    records = [
        record(1, "a guy with a dog and a ball"),
        record(2, "a guy with a dog"),
        record(3, "a scenic view"),
        record(4, "a guy"),
        record(5, "a dog", objects=("dog", "ball")),
    ]
    image_tags = {
        1: ["dogs", "ball"],  # synonyms and plurals resolve to the canonical names
        2: ["bus"],  # nothing in common: the captions' tags stay
        3: ["Bear", "kite"],  # captions name nothing: the image's tags, unknown ones kept
        5: ["bus"],  # dataset objects are ground truth and not intersected
    }
    tags, summary = o.tag_records(records, image_tags)
    assert tags == [("dog", "ball"), ("man", "dog"), ("bear", "kite"), ("man",), ("dog", "ball")]
    assert summary["tagged"] == 5 and summary["untagged"] == 0
    assert summary["from_dataset"] == 1


def test_summary_counts() -> None:
    o = ontology(min_pairs=2)
    records = [record(1, "a dog"), record(2, "a puppy"), record(3, "a guy"), record(4, "sky")]
    tags, summary = o.tag_records(records)
    assert tags == [("dog",), ("dog",), ("man",), ()]
    assert summary["pairs"] == 4 and summary["tagged"] == 3 and summary["untagged"] == 1
    assert summary["untagged_image_ids"] == [4]
    assert summary["objects"] == 2 and summary["same_object_candidates"] == 1
    assert summary["top_objects"] == [("dog", 2), ("man", 1)]
    assert "3 of 4 pairs tagged (75.0%)" in format_summary(summary)


def test_untagged_keep_drop_error(caplog: pytest.LogCaptureFixture) -> None:
    records = [record(i, "a dog" if i % 3 == 0 else "the sky") for i in range(9)]
    kept, summary = ontology(untagged="keep").prepare(records)
    assert len(kept) == 9 and summary["kept"] == 9
    assert [r.objects for r in kept[:2]] == [("dog",), ()]
    with caplog.at_level(logging.INFO, logger="adaptalign.datamodules.ontology"):
        dropped, summary = ontology(untagged="drop").prepare(records)
    assert [r.image_id for r in dropped] == [0, 3, 6] and summary["kept"] == 3
    assert "left out 6 of 9 training images" in caplog.text
    with pytest.raises(DatasetFormatError, match=r"6 of 9 .*image ids 1, 2, 4, 5, 7, \.\.\.\)"):
        ontology(untagged="error").prepare(records)
    everything_tagged = [record(i, "a dog") for i in range(3)]
    assert len(ontology(untagged="error").prepare(everything_tagged)[0]) == 3


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"untagged": "ignore"}, r"ontology.untagged='ignore'; expected one of keep, drop, error"),
        ({"min_pairs": 0}, r"ontology.min_pairs=0; expected an integer >= 1"),
        ({"min_pairs": True}, r"ontology.min_pairs=True"),
        ({"vocabulary": " "}, r"ontology.vocabulary=' '; expected a built-in"),
        ({"use_dataset_objects": "yes"}, r"ontology.use_dataset_objects='yes'"),
    ],
)
def test_bad_settings_are_refused(config: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        OntologyConfig(**config)


def test_missing_vocabulary_file_is_a_setting_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"no such file and not a built-in.*everyday"):
        Ontology.from_config(OntologyConfig(vocabulary=str(tmp_path / "nope.json")))


def test_vocabulary_file_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, {"cat": ["cat", "kitten"]})
    o = Ontology.from_config(OntologyConfig(vocabulary=path))
    assert o.tag_caption("two kittens") == ("cat",)
    assert o.source == path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"cat": ["cat"', r"not valid JSON at line 1"),
        ('["cat"]', r"top level is a JSON list"),
        ("{}", r"no entries"),
        ({"cat": "cat"}, r"entry 'cat': got 'cat'; expected a non-empty list"),
        ({"cat": []}, r"entry 'cat': got \[\]; expected a non-empty list"),
        ({"cat": ["cat", 3]}, r"entry 'cat', synonym \[1\]: got 3; expected a string"),
        ({"cat": ["cat", "--"]}, r"entry 'cat', synonym \[1\]: got '--'"),
        ({"42": ["cat"]}, r"entry '42': the object name has no letters"),
        (
            {"cat": ["cat", "kitty"], "kitten": ["Kitty"]},
            r"entry 'kitten': synonym 'kitty' is already a synonym of 'cat'",
        ),
        ('{"cat": ["cat"], "cat": ["kitten"]}', r"entry 'cat' appears more than once"),
    ],
)
def test_bad_vocabulary_files_name_file_and_entry(
    tmp_path: Path, content: object, message: str
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(DatasetFormatError, match=message) as info:
        Ontology.from_config(OntologyConfig(vocabulary=path))
    assert str(info.value).startswith(path)


def test_explicit_synonym_beats_a_generated_plural() -> None:
    o = Ontology({"glass": ["glass"], "eyewear": ["glasses"]})
    assert o.tag_caption("glasses") == ("eyewear",)
    assert o.tag_caption("a glass") == ("glass",)


def test_builtin_everyday_vocabulary() -> None:
    assert "everyday" in builtin_vocabularies()
    o = Ontology.from_config(OntologyConfig())
    assert o.source.endswith("everyday.json")
    assert len(o.objects) >= 80 + 20
    for coco in ("person", "teddy bear", "hot dog", "cell phone", "dining table", "toothbrush"):
        assert coco in o.objects
    caption = "Two men and a little girl play with a puppy and a ball on the beach near the water"
    assert o.tag_caption(caption) == ("man", "girl", "dog", "sports ball", "beach", "water")
    assert o.tag_caption("A woman in an orange T-shirt eats oranges and a hot dog") == (
        "woman",
        "shirt",
        "orange",
        "hot dog",
    )
    assert o.tag_caption("people, children and toddlers") == ("person", "child")
    assert o.tag_caption("a teddy bear on a bed") == ("teddy bear", "bed")


def test_data_module_reads_image_side_tags(tmp_path: Path) -> None:
    import json

    from adaptalign.datamodules.datamodule import AlignmentDataModule
    from adaptalign.datamodules.generated import GeneratedConfig

    vocabulary = tmp_path / "shapes.json"
    shapes = ["circle", "square", "triangle", "star", "diamond", "cross", "ring", "heart"]
    vocabulary.write_text(json.dumps({s: [s] for s in shapes}))

    def module(image_tags: str | None) -> AlignmentDataModule:
        data = AlignmentDataModule(
            generated=GeneratedConfig(num_train=32, num_val=8, num_test=8, image_size=32),
            cache_dir=str(tmp_path / "cache"),
            batch_size=8,
            sampler="curriculum",
            ontology=OntologyConfig(
                vocabulary=str(vocabulary), use_dataset_objects=False, image_tags=image_tags
            ),
        )
        data.setup()
        return data

    plain = module(None)
    several = next(r for r in plain.splits["train"] if len(r.objects) >= 2)
    chosen = several.objects[-1]
    tags_file = tmp_path / "image_tags.json"
    tags_file.write_text(json.dumps({several.image_path.name: [chosen, "table"]}))
    tagged = {r.image_id: r.objects for r in module(str(tags_file)).splits["train"]}
    assert tagged[several.image_id] == (chosen,)  # captions' tags intersected with the image's
    others = {
        r.image_id: r.objects for r in plain.splits["train"] if r.image_id != several.image_id
    }
    assert all(tagged[i] == o for i, o in others.items())

    tags_file.write_text(json.dumps({several.image_path.name: "dog"}))
    with pytest.raises(DatasetFormatError, match=r"image_tags.json: entry .* expected a list"):
        module(str(tags_file))
    with pytest.raises(ConfigurationError, match=r"ontology.image_tags: .* does not exist"):
        module(str(tmp_path / "missing.json"))
