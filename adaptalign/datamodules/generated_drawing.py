"""Drawing a generated scene: shapes filled in their grid cells on a grey background."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

from adaptalign.datamodules.generated_scenes import COLOURS, POSITIONS, SceneObject

BACKGROUND = (140, 140, 140)  # neutral grey, distinct from every colour of COLOURS
SIZE_RADIUS = {"small": 0.25, "large": 0.4}  # in grid-cell units
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
