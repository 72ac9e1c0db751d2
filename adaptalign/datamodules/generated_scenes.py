"""Scenes of the generated dataset and their captions: what is drawn, and how it is described.

Categories (a colour and a shape) follow a seeded Zipf law, so a few are common and most are rare;
a hard negative is a copy of an earlier scene with one object recoloured or moved. Captions name
every object's size, colour, shape and position in paraphrases drawn from small grammars.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

# canonical shape name -> the words captions may use for it (the canonical name first)
SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
    "ring": ("ring", "hoop"),
    "heart": ("heart",),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 135, 10),
    "yellow": (245, 225, 20),
    "green": (30, 160, 50),
    "cyan": (20, 210, 220),
    "blue": (30, 60, 210),
    "purple": (130, 40, 170),
    "pink": (250, 120, 190),
}
SIZES: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
JITTER = 0.08  # in grid-cell units; radius + jitter < 0.5 keeps every object inside its cell

# grid cells in row-major order, and how captions may name each
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    **{
        corner: (f"at the {corner}", f"in the {corner} corner", f"in the {corner}")
        for corner in ("top left", "top right", "bottom left", "bottom right")
    },
    **{
        edge: (f"at the {edge}", f"at the {edge} edge", f"in the {edge} middle")
        for edge in ("top", "bottom")
    },
    **{
        side: (f"on the {side}", f"at the {side} side", f"on the {side} side")
        for side in ("left", "right")
    },
    "centre": ("in the centre", "in the middle", "at the centre"),
}
TEMPLATES = (
    "{objects}",
    "there is {objects}",
    "an image showing {objects}",
    "a picture of {objects}",
    "{count} {noun}: {objects}",
    "{count} {noun} on a grey background: {objects}",
    "a grey canvas with {objects}",
)
OBJECT_FORMS = (
    "a {size} {colour} {shape} {position}",
    "a {size} {colour} {shape} placed {position}",
    "a {size} {colour} {shape} that sits {position}",
)
COUNT_WORDS = ("one", "two", "three", "four")
NOUNS = ("shape", "object")

Category = tuple[str, str]  # (colour, shape)
CATEGORIES: tuple[Category, ...] = tuple((c, s) for s in SHAPES for c in COLOURS)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; ``jitter`` (cell units) only moves pixels, captions ignore it."""

    colour: str
    shape: str
    size: str
    position: str
    jitter: tuple[float, float] = (0.0, 0.0)

    def to_json(self) -> dict[str, str]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
        }


# ---------------------------------------------------------------------------------------------
# sampling


def category_ranking(rng: np.random.Generator) -> list[Category]:
    """A seeded frequency order of the categories, so which ones form the head varies by seed."""
    return [CATEGORIES[i] for i in rng.permutation(len(CATEGORIES))]


def zipf_probabilities(count: int, exponent: float) -> np.ndarray:
    """p(rank k) proportional to k**-exponent for ranks 1..count."""
    weights = np.arange(1, count + 1, dtype=np.float64) ** -float(exponent)
    return weights / weights.sum()


def sample_categories(
    rng: np.random.Generator, count: int, ranking: Sequence[Category], zipf_exponent: float
) -> list[Category]:
    """``count`` independent draws from the Zipf law over ``ranking`` (first = most frequent)."""
    picks = rng.choice(len(ranking), size=count, p=zipf_probabilities(len(ranking), zipf_exponent))
    return [ranking[i] for i in picks]


def sample_scene(
    rng: np.random.Generator, max_objects: int, ranking: Sequence[Category], zipf_exponent: float
) -> list[SceneObject]:
    """1..max_objects objects with long-tailed categories in distinct grid cells."""
    count = int(rng.integers(1, max_objects + 1))
    categories = sample_categories(rng, count, ranking, zipf_exponent)
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    sizes = rng.integers(len(SIZES), size=count)
    jitter = rng.uniform(-JITTER, JITTER, size=(count, 2))
    size_names = list(SIZES)
    return [
        SceneObject(colour, shape, size_names[s], POSITIONS[c], (float(dx), float(dy)))
        for (colour, shape), c, s, (dx, dy) in zip(categories, cells, sizes, jitter, strict=True)
    ]


def hard_negative(
    rng: np.random.Generator,
    source: Sequence[SceneObject],
    ranking: Sequence[Category],
    zipf_exponent: float,
) -> list[SceneObject]:
    """A copy of ``source`` with one object recoloured (same shape) or moved to a free cell.

    The new colour follows the category frequencies, so hard negatives keep the long tail.
    """
    objects = list(source)
    k = int(rng.integers(len(objects)))
    target = objects[k]
    if rng.random() < 0.5:
        probabilities = zipf_probabilities(len(ranking), zipf_exponent)
        options = [
            (i, colour)
            for i, (colour, shape) in enumerate(ranking)
            if shape == target.shape and colour != target.colour
        ]
        weights = np.array([probabilities[i] for i, _ in options])
        weights = weights / weights.sum() if weights.sum() > 0 else None
        objects[k] = replace(target, colour=options[int(rng.choice(len(options), p=weights))][1])
    else:
        taken = {o.position for o in objects}
        free = [p for p in POSITIONS if p not in taken]
        objects[k] = replace(target, position=free[int(rng.integers(len(free)))])
    return objects


# ---------------------------------------------------------------------------------------------
# captions


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def describe_object(rng: np.random.Generator, obj: SceneObject) -> str:
    """One paraphrase naming the object's size, colour, shape and position."""
    return _pick(rng, OBJECT_FORMS).format(
        size=_pick(rng, SIZES[obj.size]),
        colour=obj.colour,
        shape=_pick(rng, SHAPES[obj.shape]),
        position=_pick(rng, POSITION_PHRASES[obj.position]),
    )


def caption_scene(rng: np.random.Generator, objects: Sequence[SceneObject]) -> str:
    """One caption mentioning every object, in a random order and sentence template."""
    parts = [describe_object(rng, objects[i]) for i in rng.permutation(len(objects))]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    noun = _pick(rng, NOUNS) + ("" if len(parts) == 1 else "s")
    return _pick(rng, TEMPLATES).format(
        objects=listed, count=COUNT_WORDS[len(parts) - 1], noun=noun
    )


def make_captions(
    rng: np.random.Generator, objects: Sequence[SceneObject], count: int
) -> list[str]:
    """``count`` captions, distinct unless the grammar runs out of paraphrases."""
    captions: list[str] = []
    for _ in range(20 * count):
        caption = caption_scene(rng, objects)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                return captions
    return [captions[i % len(captions)] for i in range(count)]
