"""Object vocabularies: canonical objects, the words that name them, and how captions match.

Vocabulary files are JSON objects mapping a canonical name (the tag) to every singular form that
names it, for example ``{"hot dog": ["hot dog", "hotdog", "frankfurter"]}``. The list is exactly
what is matched: the canonical name is not added on its own, so an ambiguous name can be left out
(the built-in "orange" fruit matches "oranges" and "tangerine" but not the colour "orange").
Plurals are generated (see :func:`plural`), so files list singular forms only; a form that
already ends in a plural "s" ("skis", "scissors", "oranges") is left as it is.

Matching rules:

* Text is lower-cased and split into words made of letters only: digits, spaces, apostrophes and
  hyphens all separate words. "T-shirt", "t shirt" and "T shirt" are therefore the same two
  words, and a hyphenated synonym in a file matches both spellings. A possessive leaves a
  separate "s" behind ("man's" reads as "man s"), which still names the man.
* A synonym of several words matches the same words in a row.
* Scanning left to right, the longest synonym starting at a word wins, so "hot dog" is never
  also a "dog", and "teddy bear" is never also a "bear".
* A form written explicitly under two different objects is an error; a generated plural never
  overrides an explicit form ("glasses" stays the eyewear even if "glass" were listed), and
  between two generated plurals the object listed first keeps it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.records import parse_json_object

VOCABULARY_PACKAGE = "adaptalign.datamodules"
VOCABULARY_FOLDER = "vocabularies"

_WORD = re.compile(r"[^\W\d_]+")

# Words whose plural is the same word.
INVARIANT_PLURALS = frozenset(
    {"sheep", "fish", "deer", "moose", "bison", "aircraft", "salmon", "series", "species"}
)
# Irregular endings; matched as word endings so "fireman", "grandchild" and "dormouse" follow.
IRREGULAR_ENDINGS = (
    ("person", "people"),
    ("child", "children"),
    ("man", "men"),  # also "woman", "fireman", "gentleman"
    ("mouse", "mice"),
    ("louse", "lice"),
    ("goose", "geese"),
    ("foot", "feet"),
    ("tooth", "teeth"),
    ("ox", "oxen"),
)
# Words ending like an irregular one that are regular after all.
REGULAR_EXCEPTIONS = frozenset(
    {
        "human",
        "german",
        "roman",
        "shaman",
        "talisman",
        "caiman",
        "ottoman",
        "box",
        "fox",
        "mongoose",
    }
)
# f / fe words whose plural is "ves"; others ("roof", "chef", "giraffe") just add "s".
VES_PLURALS = {
    "knife": "knives",
    "wife": "wives",
    "life": "lives",
    "leaf": "leaves",
    "loaf": "loaves",
    "shelf": "shelves",
    "wolf": "wolves",
    "calf": "calves",
    "half": "halves",
    "scarf": "scarves",
    "thief": "thieves",
    "elf": "elves",
    "hoof": "hooves",
}
# Words ending in "o" whose plural adds "es"; others ("photo", "piano", "zoo") add "s".
OES_PLURALS = frozenset({"potato", "tomato", "hero", "echo", "torpedo", "mosquito"})


# ---------------------------------------------------------------------------------------------
# words


def words(text: str) -> tuple[str, ...]:
    """Lower-cased words of letters only; everything else (hyphens included) separates words."""
    return tuple(_WORD.findall(text.lower()))


def plural(word: str) -> str:
    """The regular or irregular English plural of one lower-case singular word.

    A word that already looks plural (ends in "s" but not "ss" or "us") is returned as it
    is, so pluralia tantum such as "scissors" and "jeans" can be listed directly.
    """
    if word in INVARIANT_PLURALS:
        return word
    if word not in REGULAR_EXCEPTIONS:
        for singular, irregular in IRREGULAR_ENDINGS:
            if word.endswith(singular):
                return word[: len(word) - len(singular)] + irregular
    if word.endswith("s") and not word.endswith(("ss", "us")):
        return word
    if word in VES_PLURALS:
        return VES_PLURALS[word]
    if word.endswith(("s", "x", "z", "ch", "sh")) or word in OES_PLURALS:
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def plural_phrase(phrase: tuple[str, ...]) -> tuple[str, ...]:
    """Plural of a multi-word name: its last word changes ("teddy bear" -> "teddy bears")."""
    return (*phrase[:-1], plural(phrase[-1]))


# ---------------------------------------------------------------------------------------------
# vocabulary files


def builtin_vocabularies() -> list[str]:
    """Names of the vocabularies shipped with the package."""
    folder = resources.files(VOCABULARY_PACKAGE).joinpath(VOCABULARY_FOLDER)
    return sorted(
        entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json")
    )


def vocabulary_source(vocabulary: str) -> tuple[str, str]:
    """The text of a vocabulary and the name errors should give for it (its file)."""
    if vocabulary in builtin_vocabularies():
        folder = resources.files(VOCABULARY_PACKAGE).joinpath(VOCABULARY_FOLDER)
        entry = folder.joinpath(f"{vocabulary}.json")
        return entry.read_text(encoding="utf-8"), str(entry)
    path = Path(vocabulary).expanduser()
    if not path.is_file():
        raise ConfigurationError(
            f"ontology.vocabulary={vocabulary!r}: no such file and not a built-in vocabulary; "
            f"expected one of {', '.join(builtin_vocabularies())} or the path of a JSON file"
        )
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: cannot read the vocabulary file ({exc})") from exc


def parse_vocabulary(text: str, source: str) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Canonical name -> its synonyms as word sequences, checked entry by entry.

    Duplicate names are caught (plain JSON loading would silently keep the last one).
    """
    duplicates: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    example = '{"dog": ["dog", "puppy"], "hot dog": ["hot dog", "hotdog"]}'
    top = parse_json_object(text, source, f"a vocabulary like {example}", example, pairs_hook)
    if duplicates:
        raise DatasetFormatError(
            f"{source}: entry {duplicates[0]!r} appears more than once; expected each object once"
        )
    if not top:
        raise DatasetFormatError(f"{source}: no entries; expected at least one object")
    vocabulary: dict[str, tuple[tuple[str, ...], ...]] = {}
    for name, synonyms in top.items():
        if not words(name):
            raise DatasetFormatError(
                f"{source}: entry {name!r}: the object name has no letters; expected a name "
                "such as 'dog'"
            )
        if not isinstance(synonyms, list) or not synonyms:
            raise DatasetFormatError(
                f"{source}: entry {name!r}: got {synonyms!r}; expected a non-empty list of the "
                "singular words that name it"
            )
        forms: list[tuple[str, ...]] = []
        for j, synonym in enumerate(synonyms):
            if not isinstance(synonym, str) or not words(synonym):
                raise DatasetFormatError(
                    f"{source}: entry {name!r}, synonym [{j}]: got {synonym!r}; expected a string "
                    "with at least one word of letters"
                )
            if words(synonym) not in forms:
                forms.append(words(synonym))
        vocabulary[name] = tuple(forms)
    return vocabulary


def build_matcher(
    vocabulary: Mapping[str, Sequence[tuple[str, ...]]], source: str
) -> dict[tuple[str, ...], str]:
    """Word sequence -> canonical name, explicit forms first, then generated plurals."""
    matcher: dict[tuple[str, ...], str] = {}
    for name, forms in vocabulary.items():
        for form in forms:
            other = matcher.get(form)
            if other is not None and other != name:
                raise DatasetFormatError(
                    f"{source}: entry {name!r}: synonym {' '.join(form)!r} is already a synonym "
                    f"of {other!r}; expected each synonym under one object only"
                )
            matcher[form] = name
    for name, forms in vocabulary.items():
        for form in forms:
            matcher.setdefault(plural_phrase(form), name)
    return matcher
