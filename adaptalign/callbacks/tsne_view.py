"""t-SNE pictures of the shared embedding space, to see whether images and captions really mix.

A retrieval score says how well the towers align; a joint t-SNE of image and caption embeddings
shows how: whether the modalities sit in two separate islands (a modality gap) or interleave, and
whether caption clusters (head and tail concepts) stay together. :class:`TSNEView` draws one per
validation epoch (and feeds TensorBoard's projector); :func:`tsne_from_predictions` and ``adaptalign
tsne`` draw one from the embeddings file ``adaptalign predict`` writes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
from torch import Tensor

from adaptalign.errors import ConfigurationError

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


def _check_settings(max_points: int, perplexity: float, max_iter: int) -> None:
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise ConfigurationError(f"max_points={max_points!r}; expected an integer >= 1")
    if isinstance(perplexity, bool) or not isinstance(perplexity, int | float) or perplexity <= 0:
        raise ConfigurationError(f"perplexity={perplexity!r}; expected a number > 0")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < MIN_ITERATIONS:
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

    _check_settings(max_points, perplexity, max_iter)
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
    """:func:`view_figure` written as a PNG to ``path``; its path."""
    figure = view_figure(coordinates, clusters, image_ids, title, image_objects)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=100)
    return out


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    c = coordinates
    figure = Figure(figsize=(12, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
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


def _clean(text: str) -> str:
    """One TSV cell: TensorBoard's metadata file breaks on tabs and newlines."""
    return " ".join(text.split())


class TSNEView(L.Callback):
    """Draws a joint t-SNE of validation images and captions every few epochs.

    The first ``max_points`` validation images of global rank 0 (of the first validation loader)
    are embedded again with all their captions, under ``torch.no_grad``. At the epoch's end the
    view is written to ``<log dir>/tsne/tsne_epoch{E:03d}.png`` and, when the logger's
    ``experiment`` can, logged as the image ``val/tsne`` and (``projector``) as TensorBoard
    projector embeddings with columns modality, cluster and text. Nothing happens while Lightning
    sanity-checks, nor on epochs ``E`` where ``E + 1`` is not a multiple of ``every_n_epochs``, nor
    when the trainer has no log directory. The t-SNE fit runs on the CPU of rank 0.

    Args:
        every_n_epochs: draw after epochs 0-based ``E`` with ``(E + 1) % every_n_epochs == 0``.
        max_points: images per view (each with all its captions).
        perplexity: t-SNE perplexity, clamped to what the number of points allows.
        projector: also write TensorBoard projector embeddings.
        seed: t-SNE random state.
        max_iter: t-SNE optimisation iterations (at least 250).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_points: int = 1000,
        perplexity: float = 30.0,
        projector: bool = True,
        seed: int = 0,
        max_iter: int = 1000,
    ) -> None:
        if (
            isinstance(every_n_epochs, bool)
            or not isinstance(every_n_epochs, int)
            or every_n_epochs < 1
        ):
            raise ConfigurationError(f"every_n_epochs={every_n_epochs!r}; expected an integer >= 1")
        _check_settings(max_points, perplexity, max_iter)
        self.every_n_epochs = every_n_epochs
        self.max_points = max_points
        self.perplexity = float(perplexity)
        self.projector = projector
        self.seed = seed
        self.max_iter = max_iter
        self.last_path: Path | None = None
        self.last_coordinates: TSNECoordinates | None = None
        self._collecting = False
        self._reset()

    def _reset(self) -> None:
        self._images: list[Tensor] = []
        self._image_ids: list[Tensor] = []
        self._texts: list[Tensor] = []
        self._text_image_ids: list[Tensor] = []
        self._captions: list[str] = []
        self._clusters: list[Tensor] | None = []
        self._count = 0

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self._collecting = self._due(trainer) and trainer.is_global_zero

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: object,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._collecting or dataloader_idx != 0 or self._count >= self.max_points:
            return
        with torch.no_grad(), trainer.precision_plugin.val_step_context():
            images = pl_module.encode_images(batch)
            texts = pl_module.encode_texts(batch)
        room = self.max_points - self._count
        image_ids = batch["image_id"][:room].detach().cpu()
        owners = batch["text_image_id"].detach().cpu()
        keep = torch.isin(owners, image_ids)
        self._images.append(images[:room].detach().float().cpu())
        self._image_ids.append(image_ids)
        self._texts.append(texts.detach().float().cpu()[keep])
        self._text_image_ids.append(owners[keep])
        self._captions.extend(t for t, k in zip(batch["texts"], keep.tolist(), strict=True) if k)
        clusters = batch.get("text_cluster")
        if clusters is None or self._clusters is None:
            self._clusters = None
        else:
            self._clusters.append(torch.as_tensor(clusters).detach().cpu()[keep])
        self._count += image_ids.numel()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        log_dir = trainer.log_dir  # a collective call: every rank must make it
        collected = self._count
        if not trainer.is_global_zero or log_dir is None or collected == 0:
            self._reset()
            return
        images = torch.cat(self._images)
        image_ids = torch.cat(self._image_ids)
        texts = torch.cat(self._texts)
        text_image_ids = torch.cat(self._text_image_ids)
        clusters = None if self._clusters is None else torch.cat(self._clusters)
        captions = self._captions
        self._reset()
        if images.shape[0] + texts.shape[0] < 2:
            log.info("t-SNE view skipped: fewer than 2 validation points")
            return
        row_of = {int(i): row for row, i in enumerate(image_ids.tolist())}
        owner = torch.tensor([row_of[int(i)] for i in text_image_ids.tolist()], dtype=torch.long)
        epoch = trainer.current_epoch
        coordinates = tsne_coordinates(
            images, texts, owner, self.seed, self.max_points, self.perplexity, self.max_iter
        )
        path = Path(log_dir) / "tsne" / f"tsne_epoch{epoch:03d}.png"
        records = getattr(getattr(trainer, "datamodule", None), "records", None)
        objects = primary_objects(records, image_ids.tolist())
        plot_coordinates(coordinates, path, clusters, image_ids, image_objects=objects)
        self.last_path, self.last_coordinates = path, coordinates
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger else None
        add_image = getattr(experiment, "add_image", None)
        if callable(add_image):
            from PIL import Image

            with Image.open(path) as picture:
                pixels = np.asarray(picture.convert("RGB"))
            add_image("val/tsne", pixels, global_step=trainer.global_step, dataformats="HWC")
        add_embedding = getattr(experiment, "add_embedding", None)
        if self.projector and callable(add_embedding):
            metadata = projector_metadata(image_ids, owner, captions, clusters)
            add_embedding(
                torch.cat([images, texts]),
                metadata=metadata,
                metadata_header=["modality", "cluster", "text"],
                tag="val_embeddings",
                global_step=epoch,
            )


def projector_metadata(
    image_ids: Tensor, text_image: Tensor, captions: Sequence[str], clusters: Tensor | None
) -> list[list[str]]:
    """Rows (images first, then captions) of modality, cluster and text for the projector.

    An image's text is ``image <id>`` and its cluster its first caption's; without clusters the
    column says ``none``. Tabs and newlines in captions become spaces.
    """
    if clusters is None:
        image_clusters = ["none"] * image_ids.numel()
        text_clusters = ["none"] * len(captions)
    else:
        labels = clusters.long().numpy()
        firsts = first_caption_clusters(text_image.numpy(), labels, image_ids.numel())
        image_clusters = [str(v) if v >= 0 else "none" for v in firsts.tolist()]
        text_clusters = [str(v) for v in labels.tolist()]
    rows = [
        ["image", cluster, f"image {i}"]
        for i, cluster in zip(image_ids.tolist(), image_clusters, strict=True)
    ]
    rows += [
        ["text", cluster, _clean(caption) or "(empty)"]
        for caption, cluster in zip(captions, text_clusters, strict=True)
    ]
    return rows


def load_predictions(path: str | Path) -> dict:
    """The embeddings file ``adaptalign predict`` writes, checked enough to draw a view from."""
    path = Path(path)
    expected = (
        "expected a torch.save dict with keys "
        f"{', '.join(PREDICTION_KEYS)}, as `adaptalign predict` writes (EmbeddingWriter)"
    )
    if not path.is_file():
        raise ConfigurationError(f"{path}: embeddings file not found; {expected}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigurationError(f"{path}: cannot be loaded ({exc}); {expected}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path}: holds a {type(data).__name__}; {expected}")
    missing = [key for key in PREDICTION_KEYS if key not in data]
    if missing:
        raise ConfigurationError(f"{path}: missing key(s) {', '.join(missing)}; {expected}")
    if not all(isinstance(data[key], Tensor) for key in PREDICTION_KEYS):
        raise ConfigurationError(f"{path}: {', '.join(PREDICTION_KEYS)} must be tensors")
    images, texts = data["image_embeddings"], data["text_embeddings"]
    if (
        images.ndim != 2
        or texts.ndim != 2
        or images.shape[1] != texts.shape[1]
        or data["image_id"].shape != (images.shape[0],)
        or data["text_image_id"].shape != (texts.shape[0],)
    ):
        raise ConfigurationError(
            f"{path}: expected image_embeddings [images, dim] with image_id [images] and "
            f"text_embeddings [texts, dim] with text_image_id [texts]; got "
            f"{tuple(images.shape)}, {tuple(data['image_id'].shape)}, {tuple(texts.shape)}, "
            f"{tuple(data['text_image_id'].shape)}"
        )
    ids = data["image_id"].tolist()
    if len(set(ids)) != len(ids):
        raise ConfigurationError(f"{path}: image_id repeats ids; expected one row per image")
    stray = sorted(set(data["text_image_id"].tolist()) - set(ids))
    if stray:
        raise ConfigurationError(
            f"{path}: text_image_id names images not in image_id ({stray[:5]}); expected every "
            "caption's image among the file's images"
        )
    return data


def tsne_from_predictions(
    path: str | Path,
    output: str | Path,
    seed: int = 0,
    max_points: int = 2000,
    perplexity: float = 30.0,
    max_iter: int = 1000,
    progress: bool = False,
) -> Path:
    """A view of the embeddings file at ``path`` (see :func:`load_predictions`), to ``output``.

    A ``text_cluster`` tensor in the file, when present, colours the cluster panel; otherwise
    ``image_objects`` (each image's primary object, ``""`` when unknown), when present, does; else
    image ids do. ``progress`` reports each stage and the fit's iterations on standard output.
    """
    data = load_predictions(path)
    row_of = {i: row for row, i in enumerate(data["image_id"].tolist())}
    owner = torch.tensor([row_of[i] for i in data["text_image_id"].tolist()], dtype=torch.long)
    clusters = data.get("text_cluster")
    if clusters is not None and (
        not isinstance(clusters, Tensor) or clusters.shape != data["text_image_id"].shape
    ):
        raise ConfigurationError(f"{path}: text_cluster must be a tensor of one label per text")
    objects = data.get("image_objects")
    if objects is not None and (
        not isinstance(objects, list | tuple)
        or len(objects) != len(row_of)
        or not all(isinstance(name, str) for name in objects)
    ):
        raise ConfigurationError(
            f"{path}: image_objects must be a list of one object name per image ('' if unknown)"
        )
    if progress:
        print(f"read {len(row_of):,} images and {len(owner):,} captions from {path}", flush=True)
    return tsne_figure(
        data["image_embeddings"],
        data["text_embeddings"],
        owner,
        clusters,
        output,
        seed=seed,
        max_points=max_points,
        perplexity=perplexity,
        image_ids=data["image_id"],
        max_iter=max_iter,
        image_objects=objects,
        progress=progress,
    )


def main(argv: list[str] | None = None) -> int:
    """``adaptalign tsne EMBEDDINGS.pt [--output view.png]``; 0 on success, 2 on a user error."""
    parser = argparse.ArgumentParser(
        prog="adaptalign tsne",
        description="Draw a joint t-SNE of the image and caption embeddings `adaptalign predict` "
        "wrote.",
    )
    parser.add_argument("embeddings", help="the .pt file written by `adaptalign predict`")
    parser.add_argument(
        "--output", "-o", help="PNG to write (default: EMBEDDINGS with suffix _tsne.png)"
    )
    parser.add_argument("--seed", type=int, default=0, help="t-SNE and subsampling seed")
    parser.add_argument("--max-points", type=int, default=2000, help="images drawn, with captions")
    parser.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    parser.add_argument("--max-iter", type=int, default=1000, help="t-SNE iterations (>= 250)")
    options = parser.parse_args(argv)
    source = Path(options.embeddings)
    output = options.output or source.with_name(f"{source.stem}_tsne.png")
    try:
        written = tsne_from_predictions(
            source,
            output,
            seed=options.seed,
            max_points=options.max_points,
            perplexity=options.perplexity,
            max_iter=options.max_iter,
            progress=True,
        )
    except ConfigurationError as exc:
        print(f"adaptalign tsne: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0
