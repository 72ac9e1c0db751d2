"""The built-in generated dataset: coloured shapes on a grid, described by paraphrased captions.

It exists so the quick start and the tests need no download, yet still exercise what matters for
data-efficient alignment: a long-tailed category distribution (Zipf, giving head and tail caption
clusters), fine-grained hard negatives (near-copies differing in one colour or position), and
several distinct captions per image. It is written once per setting into a cache, in the Karpathy
layout, so it goes through the same reader as real data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from adaptalign.common.errors import ConfigurationError
from adaptalign.common.progress import progress_bar, say
from adaptalign.datamodules.karpathy import write_karpathy

FORMAT_VERSION = 1  # bump whenever the same config would produce different files
DATASET_FILE = "dataset_generated.json"
IMAGE_FOLDER = "images"

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
BACKGROUND = (140, 140, 140)  # neutral grey, distinct from every colour above
SIZES: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
SIZE_RADIUS = {"small": 0.25, "large": 0.4}  # in grid-cell units
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


@dataclass
class GeneratedConfig:
    """Settings of the generated dataset; each distinct setting is cached separately."""

    num_train: int = 2000
    num_val: int = 250
    num_test: int = 250
    image_size: int = 64
    max_objects: int = 3
    zipf_exponent: float = 1.1
    hard_negative_rate: float = 0.2
    captions_per_image: int = 5
    seed: int = 0


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


def default_cache_dir() -> Path:
    """``$ADAPTALIGN_CACHE`` if set, else ``~/.cache/adaptalign``."""
    configured = os.environ.get("ADAPTALIGN_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "adaptalign"


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float | np.floating)) and math.isfinite(value)


def validate_config(config: GeneratedConfig) -> None:
    """Reject settings that cannot produce a usable dataset, naming the field and the rule."""
    rules = {
        "num_train": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        "num_val": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        "num_test": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        "image_size": (lambda v: _is_int(v) and v >= 32, "an integer >= 32"),
        "max_objects": (lambda v: _is_int(v) and 1 <= v <= 4, "an integer from 1 to 4"),
        "zipf_exponent": (lambda v: _is_real(v) and v >= 0, "a finite number >= 0"),
        "hard_negative_rate": (lambda v: _is_real(v) and 0 <= v <= 1, "a number from 0 to 1"),
        "captions_per_image": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    }
    for field, (ok, expected) in rules.items():
        value = getattr(config, field)
        if not ok(value):
            raise ConfigurationError(f"GeneratedConfig.{field}={value!r}; expected {expected}")


def _config_fields(config: GeneratedConfig) -> dict[str, int | float]:
    """Fields with normalised types, so equal settings (2 vs 2.0) share one cache entry."""
    fields = asdict(config)
    return {
        k: float(v) if k in ("zipf_exponent", "hard_negative_rate") else int(v)
        for k, v in fields.items()
    }


def config_key(config: GeneratedConfig) -> str:
    """Short hash naming the cache entry of a setting under the current format version."""
    payload = json.dumps(
        {"format_version": FORMAT_VERSION, **_config_fields(config)}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


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


# ---------------------------------------------------------------------------------------------
# rendering

SUPERSAMPLE = 4  # draw large, then box-filter down: smooth edges without PIL anti-aliasing


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    angles = [-math.pi / 2 + i * math.pi / points for i in range(2 * points)]
    return [
        ((1 if i % 2 == 0 else inner) * math.cos(a), (1 if i % 2 == 0 else inner) * math.sin(a))
        for i, a in enumerate(angles)
    ]


def _heart(steps: int = 48) -> list[tuple[float, float]]:
    ts = [2 * math.pi * i / steps for i in range(steps)]
    xs = [16 * math.sin(t) ** 3 for t in ts]
    ys = [
        -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        for t in ts
    ]
    mid = (max(ys) + min(ys)) / 2
    scale = max(max(abs(x) for x in xs), (max(ys) - min(ys)) / 2)
    return [(x / scale, (y - mid) / scale) for x, y in zip(xs, ys, strict=True)]


_ARM = 0.32
OUTLINES: dict[str, list[tuple[float, float]]] = {  # unit-radius outlines of polygon shapes
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)],
    "star": _star(),
    "cross": [
        (-_ARM, -1),
        (_ARM, -1),
        (_ARM, -_ARM),
        (1, -_ARM),
        (1, _ARM),
        (_ARM, _ARM),
        (_ARM, 1),
        (-_ARM, 1),
        (-_ARM, _ARM),
        (-1, _ARM),
        (-1, -_ARM),
        (-_ARM, -_ARM),
    ],
    "diamond": [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)],
    "heart": _heart(),
}


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, cell: float) -> None:
    row, col = divmod(POSITIONS.index(obj.position), 3)
    cx = (col + 0.5 + obj.jitter[0]) * cell
    cy = (row + 0.5 + obj.jitter[1]) * cell
    r = SIZE_RADIUS[obj.size] * cell
    colour = COLOURS[obj.colour]
    box = (cx - r, cy - r, cx + r, cy + r)
    if obj.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif obj.shape == "ring":
        draw.ellipse(box, outline=colour, width=max(1, round(0.35 * r)))
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in OUTLINES[obj.shape]], fill=colour)


def render(objects: Sequence[SceneObject], image_size: int) -> Image.Image:
    """The scene as an RGB image of ``image_size`` pixels square."""
    side = image_size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj, side / 3)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------
# writing


def _entry(imgid: int, split: str, captions: list[str], objects: Sequence[SceneObject]) -> dict:
    first = imgid * len(captions)
    sentences = [
        {
            "raw": c,
            "tokens": c.replace(":", " ").replace(",", " ").split(),
            "sentid": first + j,
            "imgid": imgid,
        }
        for j, c in enumerate(captions)
    ]
    return {
        "filename": f"{imgid:06d}.png",
        "filepath": IMAGE_FOLDER,
        "split": split,
        "imgid": imgid,
        "sentids": [s["sentid"] for s in sentences],
        "sentences": sentences,
        "objects": [o.to_json() for o in objects],
    }


def _write_dataset(config: GeneratedConfig, folder: Path, progress: bool) -> None:
    """Every image and the JSON into ``folder``, drawing all randomness from one seeded stream."""
    rng = np.random.default_rng(config.seed)
    ranking = category_ranking(rng)
    s = config.zipf_exponent
    (folder / IMAGE_FOLDER).mkdir()
    splits = (("train", config.num_train), ("val", config.num_val), ("test", config.num_test))
    entries: list[dict] = []
    total = sum(n for _, n in splits)
    with progress_bar(total, "generating dataset", "image", enabled=progress) as bar:
        for split, size in splits:
            earlier: list[tuple[int, list[SceneObject]]] = []  # hard negatives stay in one split
            for _ in range(size):
                imgid = len(entries)
                source = None
                if earlier and rng.random() < config.hard_negative_rate:
                    source, source_objects = earlier[int(rng.integers(len(earlier)))]
                    objects = hard_negative(rng, source_objects, ranking, s)
                else:
                    objects = sample_scene(rng, config.max_objects, ranking, s)
                captions = make_captions(rng, objects, config.captions_per_image)
                entry = _entry(imgid, split, captions, objects)
                if source is not None:
                    entry["hard_negative_of"] = source
                render(objects, config.image_size).save(
                    folder / IMAGE_FOLDER / entry["filename"], format="PNG"
                )
                entries.append(entry)
                earlier.append((imgid, objects))
                bar.update()
    extra = {"config": _config_fields(config), "format_version": FORMAT_VERSION}
    write_karpathy(folder / DATASET_FILE, entries, "generated", extra=extra)


def _publish(work: Path, final: Path) -> None:
    """Move a complete folder into place in one step; a concurrent finished copy wins."""
    os.chmod(work, 0o755)  # mkdtemp's private 0700 would hide the cache from other users
    try:
        os.rename(work, final)
    except OSError:
        if (final / DATASET_FILE).is_file():
            return  # identical content, written by a concurrent run
        # only complete folders are ever renamed in, so this one was damaged from outside
        shutil.rmtree(final)
        os.rename(work, final)


def generate_dataset(
    config: GeneratedConfig, cache_dir: str | Path | None = None, progress: bool = True
) -> Path:
    """Path of the dataset's Karpathy JSON, generating it first unless it is already cached.

    Output is a pure function of ``config``. It is built in a temporary sibling folder and
    renamed into place, so an interrupted run never leaves a partial entry behind.
    """
    validate_config(config)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / "generated" / config_key(config)
    target = final / DATASET_FILE
    if target.is_file():
        return target
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    if progress:
        images = config.num_train + config.num_val + config.num_test
        say(f"generating the dataset ({images} images) into {final}; later runs reuse it")
    try:
        _write_dataset(config, work, progress)
        _publish(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already after a successful rename
    return target
