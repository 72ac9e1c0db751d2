"""Object tags for training pairs, so a curriculum can group pairs that show the same object.

Ontology-informed sampling needs to know which object each pair is about. Datasets that annotate
objects (the generated data names its shapes) keep their own tags; otherwise a vocabulary of
canonical objects and their synonyms is matched against the captions.

The vocabulary's words, plurals and matching rules are in :mod:`adaptalign.datamodules.vocabulary`.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from adaptalign.common.checks import is_int
from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.records import Record, load_json_object
from adaptalign.datamodules.vocabulary import (
    build_matcher,
    builtin_vocabularies,
    parse_vocabulary,
    vocabulary_source,
    words,
)

log = logging.getLogger(__name__)

Untagged = Literal["keep", "drop", "error"]
UNTAGGED_CHOICES = ("keep", "drop", "error")
# How many image ids an error about untagged pairs names; the full list would drown the message.
SHOWN_IDS = 5
# How many of the most frequent objects the summary lists.
TOP_OBJECTS = 10


@dataclass
class OntologyConfig:
    """Where the object vocabulary comes from and what happens to pairs no object is found in.

    Args:
        vocabulary: a built-in vocabulary name (``everyday``: the COCO categories and common
            Flickr nouns) or the path of a JSON vocabulary file.
        use_dataset_objects: records that already carry ``objects`` (the generated data does)
            keep them instead of being tagged from their captions.
        untagged: pairs whose captions name no object are ``keep`` (their own pool, used only in
            diverse batches), ``drop`` (left out of training, the count is logged) or ``error``.
        min_pairs: objects that are the primary object of fewer training pairs never get a
            same-object batch (too few pairs to make one useful).
        image_tags: optional JSON file of image-side tags (e.g. from an object detector),
            ``{"image file name": ["dog", "frisbee"], ...}``; an image's caption tags are then
            intersected with them.
    """

    vocabulary: str = "everyday"
    use_dataset_objects: bool = True
    untagged: Untagged = "keep"
    min_pairs: int = 1
    image_tags: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.vocabulary, str) or not self.vocabulary.strip():
            raise ConfigurationError(
                f"ontology.vocabulary={self.vocabulary!r}; expected a built-in vocabulary name "
                f"({', '.join(builtin_vocabularies())}) or the path of a JSON file"
            )
        if not isinstance(self.use_dataset_objects, bool):
            raise ConfigurationError(
                f"ontology.use_dataset_objects={self.use_dataset_objects!r}; expected true or false"
            )
        if self.untagged not in UNTAGGED_CHOICES:
            choices = ", ".join(UNTAGGED_CHOICES)
            raise ConfigurationError(
                f"ontology.untagged={self.untagged!r}; expected one of {choices}"
            )
        value = self.min_pairs
        if not is_int(value) or value < 1:
            raise ConfigurationError(f"ontology.min_pairs={value!r}; expected an integer >= 1")


# ---------------------------------------------------------------------------------------------
# tagging


class Ontology:
    """Tags captions and records with canonical objects from a vocabulary."""

    def __init__(
        self,
        vocabulary: Mapping[str, Sequence[str]],
        config: OntologyConfig | None = None,
        source: str = "vocabulary",
    ) -> None:
        self.config = config or OntologyConfig()
        text = json.dumps({name: list(forms) for name, forms in vocabulary.items()})
        self.vocabulary = parse_vocabulary(text, source)
        self.source = source
        self.matcher = build_matcher(self.vocabulary, source)
        self.longest = max(len(form) for form in self.matcher)

    @classmethod
    def from_config(cls, config: OntologyConfig | None = None) -> Ontology:
        """The ontology of a built-in vocabulary or a vocabulary file."""
        config = config or OntologyConfig()
        text, source = vocabulary_source(config.vocabulary)
        vocabulary = parse_vocabulary(text, source)
        plain = {name: [" ".join(form) for form in forms] for name, forms in vocabulary.items()}
        return cls(plain, config, source)

    @property
    def objects(self) -> list[str]:
        """Canonical object names, in vocabulary order."""
        return list(self.vocabulary)

    def _mentions(self, caption: str) -> list[str]:
        """Canonical objects in the order the caption mentions them, repeats included."""
        tokens = words(caption)
        found: list[str] = []
        i = 0
        while i < len(tokens):
            for length in range(min(self.longest, len(tokens) - i), 0, -1):
                name = self.matcher.get(tokens[i : i + length])
                if name is not None:
                    found.append(name)
                    i += length
                    break
            else:
                i += 1
        return found

    def tag_caption(self, caption: str) -> tuple[str, ...]:
        """Distinct canonical objects a caption names, in order of first mention."""
        return tuple(dict.fromkeys(self._mentions(caption)))

    def resolve(self, tag: str) -> str:
        """A name for an object (canonical, a synonym or a plural) as its canonical name.

        Names the vocabulary does not know are kept, lower-cased, so image taggers with their
        own categories still work.
        """
        if tag in self.vocabulary:
            return tag
        return self.matcher.get(words(tag), tag.strip().lower())

    def caption_tags(self, captions: Sequence[str]) -> tuple[str, ...]:
        """Objects named in any caption: most captions first, then earliest first mention.

        Ranking by how many captions agree makes the primary object the one annotators
        consistently saw, not an incidental background word of one caption.
        """
        mentions: Counter[str] = Counter()
        first: dict[str, tuple[int, int]] = {}
        for c, caption in enumerate(captions):
            for position, name in enumerate(self.tag_caption(caption)):
                mentions[name] += 1
                first.setdefault(name, (c, position))
        return tuple(sorted(mentions, key=lambda name: (-mentions[name], first[name])))

    def tag_record(self, record: Record) -> tuple[str, ...]:
        """A record's tags, primary object first: the dataset's own, or from its captions."""
        if self.config.use_dataset_objects and record.objects:
            return tuple(record.objects)
        return self.caption_tags(record.captions)

    def tag_records(
        self,
        records: Sequence[Record],
        image_tags: Mapping[int, Iterable[str]] | None = None,
    ) -> tuple[list[tuple[str, ...]], dict[str, Any]]:
        """Tags of every record and a summary of them for logging.

        ``image_tags`` (image id -> object names from an image-side tagger, e.g. a detector)
        removes caption tags the image does not confirm: caption tags are intersected with them,
        keeping the caption ranking. When nothing is in both, the caption tags are kept (the
        captions are what the text tower trains on, and a detector misses objects), and a record
        whose captions name nothing takes the image tags in the order given. Tags a dataset
        supplied itself (``use_dataset_objects``) are ground truth and are not intersected.
        """
        image_tags = image_tags or {}
        tags: list[tuple[str, ...]] = []
        from_dataset = 0
        for record in records:
            if self.config.use_dataset_objects and record.objects:
                tags.append(tuple(record.objects))
                from_dataset += 1
                continue
            found = self.caption_tags(record.captions)
            if record.image_id in image_tags:
                seen = tuple(dict.fromkeys(self.resolve(t) for t in image_tags[record.image_id]))
                confirmed = tuple(t for t in found if t in seen)
                found = confirmed or found or seen
            tags.append(found)
        return tags, self.summary(records, tags, from_dataset)

    def summary(
        self, records: Sequence[Record], tags: Sequence[tuple[str, ...]], from_dataset: int = 0
    ) -> dict[str, Any]:
        """Counts worth logging: how many pairs got tags, how many objects, which are common."""
        primary = Counter(t[0] for t in tags if t)
        untagged_ids = [r.image_id for r, t in zip(records, tags, strict=True) if not t]
        threshold = max(2, self.config.min_pairs)
        return {
            "pairs": len(tags),
            "tagged": len(tags) - len(untagged_ids),
            "untagged": len(untagged_ids),
            "untagged_image_ids": untagged_ids[:SHOWN_IDS],
            "from_dataset": from_dataset,
            "objects": len({name for t in tags for name in t}),
            "primary_objects": len(primary),
            "same_object_candidates": sum(1 for n in primary.values() if n >= threshold),
            "top_objects": sorted(primary.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_OBJECTS],
        }

    def prepare(
        self,
        records: Sequence[Record],
        image_tags: Mapping[int, Iterable[str]] | None = None,
    ) -> tuple[list[Record], dict[str, Any]]:
        """Training records carrying their tags in ``objects``, with the untagged policy applied.

        Storing the tags in the records makes every batch carry them (``batch["objects"]``), so
        the sampler and batch statistics see the same tags.
        """
        tags, summary = self.tag_records(records, image_tags)
        untagged = summary["untagged"]
        if untagged and self.config.untagged == "error":
            shown = ", ".join(str(i) for i in summary["untagged_image_ids"])
            more = ", ..." if untagged > SHOWN_IDS else ""
            raise DatasetFormatError(
                f"{untagged} of {len(records)} training images have captions naming no object of "
                f"the vocabulary {self.source} (image ids {shown}{more}); expected every pair to "
                "be tagged because ontology.untagged='error' (extend the vocabulary, or set "
                "ontology.untagged to 'keep' or 'drop')"
            )
        tagged = [replace(r, objects=t) for r, t in zip(records, tags, strict=True)]
        if untagged and self.config.untagged == "drop":
            tagged = [r for r in tagged if r.objects]
            log.info(
                "left out %d of %d training images whose captions name no object of %s",
                untagged,
                len(records),
                self.source,
            )
        summary["kept"] = len(tagged)
        return tagged, summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """One log line for a :meth:`Ontology.tag_records` summary."""
    pairs = summary["pairs"]
    share = summary["tagged"] / pairs if pairs else math.nan
    top = ", ".join(f"{name} {count}" for name, count in summary["top_objects"])
    return (
        f"object tags: {summary['tagged']} of {pairs} pairs tagged ({share:.1%}), "
        f"{summary['untagged']} untagged, {summary['objects']} objects, "
        f"{summary['same_object_candidates']} with enough pairs for same-object batches; "
        f"most common: {top}"
    )


def load_image_tags(path: str | Path) -> dict[str, list[str]]:
    """Image-side tags from a JSON object mapping image file names to lists of object names."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigurationError(f"ontology.image_tags: {str(file)!r} does not exist")
    top = load_json_object(
        file,
        "image file names mapped to lists of object names",
        '{"1000268201_693b08cb0e.jpg": ["child", "stairs"]}',
    )
    tags: dict[str, list[str]] = {}
    for name, value in top.items():
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DatasetFormatError(
                f"{file}: entry {name!r} is {value!r}; expected a list of object names"
            )
        tags[name] = value
    return tags
