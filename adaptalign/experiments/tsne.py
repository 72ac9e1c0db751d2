"""``adaptalign tsne EMBEDDINGS.pt``: a t-SNE view of what ``adaptalign predict`` wrote."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from adaptalign.common.arguments import CommandParser
from adaptalign.common.errors import ConfigurationError
from adaptalign.common.tsne import PREDICTION_KEYS, tsne_figure

log = logging.getLogger(__name__)


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
    """``adaptalign tsne EMBEDDINGS.pt [--output view.png]``; bad input: ConfigurationError."""
    parser = CommandParser(
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
    written = tsne_from_predictions(
        source,
        output,
        seed=options.seed,
        max_points=options.max_points,
        perplexity=options.perplexity,
        max_iter=options.max_iter,
        progress=True,
    )
    print(f"wrote {written}")
    return 0
