"""Joint t-SNE of image and caption embeddings, and the figure that shows it.

A retrieval score says how well the towers align; a joint t-SNE shows how: whether the
modalities sit in two separate islands (a modality gap) or interleave, and whether caption
clusters (head and tail concepts) stay together. The ``TSNEView`` callback draws one per
validation epoch and ``adaptalign tsne`` one from a ``predict`` embedding file; both draw here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from adaptalign.common.checks import is_int, is_number
from adaptalign.common.errors import ConfigurationError
from adaptalign.common.figures import new_figure, save_png

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

# sklearn refuses fewer optimisation iterations than this.
MIN_ITERATIONS = 250
# Up to this many points the exact gradient is used: on two CPU cores it fitted 300 points in 2 s
# where Barnes-Hut took 17 s, and its N x N matrices (8 MB each at this size) stay small.
EXACT_UP_TO = 1000
# Images joined to their captions by thin lines in the modality panel: enough to show how far a
# caption lands from its image without hiding the points.
LINKED_IMAGES = 10
# Colours when no clusters are known: image id modulo this, one tab20 colour each.
ID_COLOURS = 20
# Keys ``adaptalign predict`` (EmbeddingWriter) writes that a view needs.
PREDICTION_KEYS = ("image_embeddings", "image_id", "text_embeddings", "text_image_id")


@dataclass
class TSNECoordinates:
    """2-D t-SNE positions of the kept images and captions, and which inputs they came from."""

    images: np.ndarray  # [kept images, 2]
    texts: np.ndarray  # [kept texts, 2]
    image_rows: np.ndarray  # kept rows of the image embeddings, ascending
    text_rows: np.ndarray  # kept rows of the text embeddings, ascending
    text_image: np.ndarray  # per kept text, its image's position in ``image_rows``
    perplexity: float  # the perplexity the fit used, after clamping


def check_settings(max_points: int, perplexity: float, max_iter: int) -> None:
    if not is_int(max_points) or max_points < 1:
        raise ConfigurationError(f"max_points={max_points!r}; expected an integer >= 1")
    if not is_number(perplexity) or perplexity <= 0:
        raise ConfigurationError(f"perplexity={perplexity!r}; expected a number > 0")
    if not is_int(max_iter) or max_iter < MIN_ITERATIONS:
        raise ConfigurationError(f"max_iter={max_iter!r}; expected an integer >= {MIN_ITERATIONS}")


def subsample(
    num_images: int, text_image_index: np.ndarray, max_points: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of at most ``max_points`` images, drawn by ``seed``, and the rows of all their texts.

    Images are kept whole with every caption, so a view never shows a caption without its image.
    """
    if num_images <= max_points:
        image_rows = np.arange(num_images)
    else:
        chosen = np.random.default_rng(seed).choice(num_images, size=max_points, replace=False)
        image_rows = np.sort(chosen)
    text_rows = np.flatnonzero(np.isin(text_image_index, image_rows))
    return image_rows, text_rows


def tsne_coordinates(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    text_image_index: Tensor,
    seed: int = 0,
    max_points: int = 2000,
    perplexity: float = 30.0,
    max_iter: int = 1000,
    progress: bool = False,
) -> TSNECoordinates:
    """One joint t-SNE of images and captions, so distances across modalities mean something.

    ``text_image_index`` gives each text's image as a row of ``image_embeddings``. At most
    ``max_points`` images (see :func:`subsample`) enter the fit with all their captions. The fit
    uses ``init="pca"`` and ``random_state=seed``, so a seed gives the same picture, with the exact
    gradient up to :data:`EXACT_UP_TO` points and Barnes-Hut beyond; perplexity is clamped to
    ``(points - 1) / 3``, the largest the Barnes-Hut neighbourhoods support. With ``progress`` the
    fit says what it fits and reports every 50 iterations (a fit of thousands of points takes
    minutes).
    """
    from sklearn.manifold import TSNE

    check_settings(max_points, perplexity, max_iter)
    images = image_embeddings.detach().cpu().float()
    texts = text_embeddings.detach().cpu().float()
    owner = text_image_index.detach().cpu().long().numpy()
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"expected [images, dim] and [texts, dim] embeddings, got {tuple(images.shape)} and "
            f"{tuple(texts.shape)}"
        )
    if owner.shape != (texts.shape[0],):
        raise ValueError(f"text_image_index has shape {owner.shape}; expected ({texts.shape[0]},)")
    if owner.size and (owner.min() < 0 or owner.max() >= images.shape[0]):
        raise ValueError(f"text_image_index must lie in [0, {images.shape[0]}); got {owner}")
    image_rows, text_rows = subsample(images.shape[0], owner, max_points, seed)
    points = np.concatenate([images[image_rows].numpy(), texts[text_rows].numpy()])
    if points.shape[0] < 2:
        raise ValueError(f"t-SNE needs at least 2 points; got {points.shape[0]}")
    used = min(float(perplexity), (points.shape[0] - 1) / 3)
    method = "exact" if points.shape[0] <= EXACT_UP_TO else "barnes_hut"
    if progress:
        print(
            f"t-SNE of {points.shape[0]:,} points ({image_rows.size:,} images, "
            f"{text_rows.size:,} captions), {method.replace('_', '-')} gradient, "
            f"{max_iter} iterations; progress every 50:",
            flush=True,
        )
    fitted = TSNE(
        n_components=2,
        perplexity=used,
        init="pca",
        random_state=seed,
        max_iter=max_iter,
        method=method,
        verbose=2 if progress else 0,
    ).fit_transform(points)
    split = image_rows.size
    return TSNECoordinates(
        images=fitted[:split],
        texts=fitted[split:],
        image_rows=image_rows,
        text_rows=text_rows,
        text_image=np.searchsorted(image_rows, owner[text_rows]),
        perplexity=used,
    )


def first_caption_clusters(
    text_image: np.ndarray, text_clusters: np.ndarray, num_images: int
) -> np.ndarray:
    """Each image's cluster: its first caption's (in text order); -1 for an uncaptioned image."""
    result = np.full(num_images, -1, dtype=np.int64)
    owners, first = np.unique(np.asarray(text_image, dtype=np.int64), return_index=True)
    result[owners] = np.asarray(text_clusters, dtype=np.int64)[first]
    return result


def primary_objects(records: Iterable[object] | None, image_ids: Iterable[int]) -> list[str]:
    """Each image's primary (first recorded) object, ``""`` when unknown.

    The generated data records every image's true objects; other data sets record none.
    """
    known = {int(r.image_id): r.objects[0] for r in records or () if getattr(r, "objects", None)}
    return [known.get(int(i), "") for i in image_ids]


def _colours(values: np.ndarray) -> np.ndarray:
    """RGBA per value: tab10 for up to 10 distinct values (tab20 pairs similar shades), tab20 for
    up to 20, a continuous map beyond; -1 is grey."""
    import matplotlib

    values = np.asarray(values, dtype=np.int64)
    known = values >= 0
    distinct = np.unique(values[known])
    rank = np.searchsorted(distinct, values)
    if distinct.size <= 10:
        colours = matplotlib.colormaps["tab10"](rank % 10)
    elif distinct.size <= ID_COLOURS:
        colours = matplotlib.colormaps["tab20"](rank % ID_COLOURS)
    else:
        colours = matplotlib.colormaps["turbo"](rank / (distinct.size - 1))
    colours[~known] = (0.6, 0.6, 0.6, 1.0)
    return colours


def plot_coordinates(
    coordinates: TSNECoordinates,
    path: str | Path,
    clusters: Tensor | np.ndarray | None = None,
    image_ids: Tensor | np.ndarray | None = None,
    title: str | None = None,
    image_objects: Sequence[str] | None = None,
) -> Path:
    """:func:`view_figure` written as a PNG to ``path`` (whole or not at all); its path."""
    return save_png(view_figure(coordinates, clusters, image_ids, title, image_objects), path)


def view_figure(
    coordinates: TSNECoordinates,
    clusters: Tensor | np.ndarray | None = None,
    image_ids: Tensor | np.ndarray | None = None,
    title: str | None = None,
    image_objects: Sequence[str] | None = None,
) -> Figure:
    """Two panels: points by modality, and points by caption cluster or object.

    ``clusters`` holds one label per text of the original input (all texts, not only kept ones);
    an image takes its first caption's cluster. Without clusters, points are coloured by their
    image's primary object when ``image_objects`` (one per image of the original input, ``""``
    when unknown) knows any, with a legend of the objects; otherwise by image id modulo 20
    (``image_ids`` of the original input, default the row numbers). A caption takes its image's
    colour, and the panel's title says which colouring it shows.
    """
    from matplotlib.collections import LineCollection

    c = coordinates
    figure = new_figure(12, 5.5, "constrained")
    by_modality, by_cluster = figure.subplots(1, 2)

    linked = np.flatnonzero(c.text_image < LINKED_IMAGES)
    segments = np.stack([c.images[c.text_image[linked]], c.texts[linked]], axis=1)
    by_modality.add_collection(LineCollection(segments, colors="0.5", linewidths=0.4, zorder=1))
    by_modality.scatter(*c.texts.T, s=8, c="tab:orange", marker="^", label="caption", zorder=2)
    by_modality.scatter(*c.images.T, s=14, c="tab:blue", marker="o", label="image", zorder=3)
    by_modality.set_title(f"by modality (lines: first {LINKED_IMAGES} images to their captions)")
    by_modality.legend(loc="best", fontsize=8)

    colouring = _colouring(c, clusters, image_ids, image_objects)
    # one mapping from values to colours for images and captions alike
    colours = _colours(np.concatenate([colouring.image_values, colouring.text_values]))
    image_colours, text_colours = colours[: c.image_rows.size], colours[c.image_rows.size :]
    by_cluster.scatter(*c.texts.T, s=8, c=text_colours, marker="^", zorder=2)
    by_cluster.scatter(*c.images.T, s=14, c=image_colours, marker="o", edgecolors="k", zorder=3)
    by_cluster.set_title(colouring.title)
    if colouring.names:
        _object_legend(by_cluster, colouring.names)
    for axes in (by_modality, by_cluster):
        axes.set_xticks([])
        axes.set_yticks([])
    figure.suptitle(
        title
        or f"t-SNE of {c.image_rows.size} images and {c.text_rows.size} captions "
        f"(perplexity {c.perplexity:.3g})"
    )
    return figure


@dataclass
class Colouring:
    """What the second panel colours by: a value per kept image and per kept text (its image's
    unless it is a cluster), the panel's title, and the object names that values 0, 1, ... stand
    for when it shows objects."""

    image_values: np.ndarray
    text_values: np.ndarray
    title: str
    names: list[str]


def _colouring(
    c: TSNECoordinates,
    clusters: Tensor | np.ndarray | None,
    image_ids: Tensor | np.ndarray | None,
    image_objects: Sequence[str] | None,
) -> Colouring:
    if clusters is not None:
        text_values = np.asarray(clusters, dtype=np.int64)[c.text_rows]
        image_values = first_caption_clusters(c.text_image, text_values, c.image_rows.size)
        count = np.unique(text_values).size
        title = f"by caption cluster ({count} clusters; image: first caption's)"
        return Colouring(image_values, text_values, title, [])
    kept = [image_objects[row] for row in c.image_rows] if image_objects is not None else []
    names = sorted({name for name in kept if name})
    if names:
        code = {name: k for k, name in enumerate(names)}
        values = np.array([code.get(name, -1) for name in kept], dtype=np.int64)
        title = f"by primary object ({len(names)} objects; caption: its image's)"
        return Colouring(values, values[c.text_image], title, names)
    ids = c.image_rows if image_ids is None else np.asarray(image_ids)[c.image_rows]
    values = np.asarray(ids, dtype=np.int64) % ID_COLOURS
    title = f"by image id mod {ID_COLOURS} (no clusters or objects known)"
    return Colouring(values, values[c.text_image], title, [])


def _object_legend(axes: Axes, names: Sequence[str]) -> None:
    """Which colour is which object, beside the panel so no point is hidden."""
    from matplotlib.lines import Line2D

    colours = _colours(np.arange(len(names)))
    handles = [
        Line2D([], [], marker="o", linestyle="", color=colour, label=name)
        for name, colour in zip(names, colours, strict=True)
    ]
    axes.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        ncols=1 if len(names) <= 20 else 2,
        frameon=False,
    )


def tsne_figure(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    text_image_index: Tensor,
    clusters: Tensor | None,
    path: str | Path,
    seed: int = 0,
    max_points: int = 2000,
    perplexity: float = 30.0,
    image_ids: Tensor | None = None,
    max_iter: int = 1000,
    image_objects: Sequence[str] | None = None,
    progress: bool = False,
) -> Path:
    """Fit (:func:`tsne_coordinates`) and draw (:func:`plot_coordinates`) one view; its path."""
    coordinates = tsne_coordinates(
        image_embeddings,
        text_embeddings,
        text_image_index,
        seed,
        max_points,
        perplexity,
        max_iter,
        progress,
    )
    return plot_coordinates(coordinates, path, clusters, image_ids, image_objects=image_objects)


def clean_text(text: str) -> str:
    """One TSV cell: TensorBoard's metadata file breaks on tabs and newlines."""
    return " ".join(text.split())
