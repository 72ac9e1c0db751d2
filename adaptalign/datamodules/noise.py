"""Caption and image noise at a chosen rate, for stress-testing how robust the alignment is.

Every perturbation is drawn from a generator seeded by the item's own key (:func:`rng_for`), not
from a shared stream, so an item is perturbed the same way whatever the order it is loaded in, the
data-loader worker that loads it or the process it runs in, and a run can be repeated exactly.

Captions: each word is, independently, affected with probability ``rate`` and then undergoes one
operation drawn uniformly from the configured ones (see :func:`noisy_caption`). Images: every
configured operation is applied with a strength proportional to ``rate`` (see :func:`noisy_image`).
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter

from adaptalign.common.checks import is_int, is_number
from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.records import Record

CAPTION_OPS = ("dropout", "swap", "replace")
IMAGE_OPS = ("gaussian", "blur")
# Image operations run in this order whatever order they are listed in: noise added after the blur
# keeps its full, documented standard deviation instead of being smoothed away.
IMAGE_OP_ORDER = ("blur", "gaussian")
# First key entries of NoiseConfig's draws, so an item's caption and image noise are independent.
CAPTION_STREAM = 1
IMAGE_STREAM = 2


def _check_rate(rate: float, name: str) -> float:
    if not is_number(rate) or not 0.0 <= rate <= 1.0:
        raise ConfigurationError(f"{name}={rate!r}; expected a number in [0, 1]")
    return float(rate)


def _check_ops(ops: Iterable[str], known: tuple[str, ...], name: str) -> tuple[str, ...]:
    if isinstance(ops, str):
        raise ConfigurationError(f"{name}={ops!r}; expected a list of names from {known}")
    ops = tuple(ops)
    unknown = [op for op in ops if op not in known]
    if not ops or unknown or len(set(ops)) != len(ops):
        raise ConfigurationError(
            f"{name}={list(ops)!r}; expected a non-empty list of distinct names from "
            f"{', '.join(known)}"
        )
    return ops


def _check_positive(value: float, name: str) -> float:
    if not is_number(value) or not value > 0:
        raise ConfigurationError(f"{name}={value!r}; expected a number > 0")
    if not math.isfinite(value):
        raise ConfigurationError(f"{name}={value!r}; expected a finite number > 0")
    return float(value)


@dataclass
class NoiseConfig:
    """How often captions and how strongly images are perturbed; rates of 0 turn noise off.

    Args:
        caption_rate: probability that any one caption word is affected.
        image_rate: strength of every image operation, from 0 (none) to 1 (full).
        caption_ops: operations an affected word draws from, uniformly: ``dropout``, ``swap``,
            ``replace``.
        image_ops: operations applied to every image: ``gaussian``, ``blur``.
        gaussian_std: pixel noise standard deviation at rate 1, in [0, 1] pixel units; the noise
            std at rate ``r`` is ``r * gaussian_std`` (linear, so halving the rate halves it).
        blur_sigma: Gaussian blur sigma in pixels at rate 1; at rate ``r`` it is ``r * blur_sigma``.
        seed: mixed into every item's key, so another seed gives other noise.
    """

    caption_rate: float = 0.0
    image_rate: float = 0.0
    caption_ops: tuple[str, ...] = CAPTION_OPS
    image_ops: tuple[str, ...] = IMAGE_OPS
    gaussian_std: float = 0.5
    blur_sigma: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.caption_rate = _check_rate(self.caption_rate, "noise.caption_rate")
        self.image_rate = _check_rate(self.image_rate, "noise.image_rate")
        self.caption_ops = _check_ops(self.caption_ops, CAPTION_OPS, "noise.caption_ops")
        self.image_ops = _check_ops(self.image_ops, IMAGE_OPS, "noise.image_ops")
        self.gaussian_std = _check_positive(self.gaussian_std, "noise.gaussian_std")
        self.blur_sigma = _check_positive(self.blur_sigma, "noise.blur_sigma")
        if not is_int(self.seed) or self.seed < 0:
            raise ConfigurationError(f"noise.seed={self.seed!r}; expected an integer >= 0")

    @property
    def active(self) -> bool:
        """Whether any caption or image is perturbed at all."""
        return self.caption_rate > 0 or self.image_rate > 0

    def caption(self, caption: str, vocabulary: Sequence[str], *key: int) -> str:
        """``caption`` perturbed, reproducibly for ``key`` (e.g. epoch, image id, caption index)."""
        if self.caption_rate == 0:
            return caption
        rng = rng_for(self.seed, CAPTION_STREAM, *key)
        return noisy_caption(caption, self.caption_rate, rng, self.caption_ops, vocabulary)

    def image(self, image: Image.Image, *key: int) -> Image.Image:
        """``image`` perturbed by this config, reproducibly for ``key`` (e.g. epoch, image id)."""
        if self.image_rate == 0:
            return image
        rng = rng_for(self.seed, IMAGE_STREAM, *key)
        return noisy_image(
            image, self.image_rate, rng, self.image_ops, self.gaussian_std, self.blur_sigma
        )


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``key``: the same item gets the same noise.

    Keys must be non-negative integers. Numpy pads short seed lists with zeros, so keys that
    differ only by trailing zeros (``(5,)`` and ``(5, 0)``) give the same generator: give one kind
    of item a key of one fixed length.
    """
    return np.random.default_rng([int(seed), *(int(k) for k in key)])


def caption_vocabulary(captions: Iterable[str]) -> list[str]:
    """Sorted distinct lower-cased words of ``captions``, the pool ``replace`` draws from.

    Words are split on whitespace and stripped of surrounding punctuation (``"dog,"`` counts as
    ``"dog"``); sorting makes the list, and so every replacement, independent of caption order.
    """
    words = set()
    for caption in captions:
        for raw in caption.lower().split():
            word = raw.strip(string.punctuation)
            if word:
                words.add(word)
    return sorted(words)


def plan_caption_noise(
    num_words: int, rate: float, rng: np.random.Generator, ops: Sequence[str]
) -> list[str | None]:
    """The operation each word position undergoes, or ``None`` for an unaffected one.

    Two draws per call, whatever the outcome: ``num_words`` uniforms (a position is affected when
    its uniform is below ``rate``) and then ``num_words`` op indices, uniform over ``ops``.
    """
    ops = _check_ops(ops, CAPTION_OPS, "caption ops")
    rate = _check_rate(rate, "caption rate")
    affected = (rng.random(num_words) < rate).tolist()
    chosen = rng.integers(len(ops), size=num_words).tolist()
    return [ops[c] if hit else None for hit, c in zip(affected, chosen, strict=True)]


def _replacement(word: str, rng: np.random.Generator, vocabulary: Sequence[str]) -> str:
    """A uniform vocabulary word other than ``word`` (lower-cased, punctuation stripped)."""
    size = len(vocabulary)
    if size == 0:
        return word
    pick = int(rng.integers(size))
    if vocabulary[pick] != word.lower().strip(string.punctuation):
        return vocabulary[pick]
    if size == 1:
        return word
    # Uniform over the other size - 1 entries: skip the original's position.
    other = int(rng.integers(size - 1))
    return vocabulary[other if other < pick else other + 1]


def noisy_caption(
    caption: str,
    rate: float,
    rng: np.random.Generator,
    ops: Sequence[str] = CAPTION_OPS,
    vocabulary: Sequence[str] = (),
) -> str:
    """``caption`` with each word, independently with probability ``rate``, perturbed.

    The caption is split on whitespace and the result re-joined with single spaces. Positions are
    planned by :func:`plan_caption_noise` and then visited left to right on the changing word list:

    * ``replace``: the word at the position becomes a vocabulary word drawn uniformly among those
      different from it (lower-cased, punctuation stripped); with no other word in ``vocabulary``
      it stays. ``vocabulary`` should hold distinct words, as :func:`caption_vocabulary` returns.
    * ``swap``: the word at the position trades places with the next word (the last word with the
      one before it); a one-word caption is left alone. Swaps keep the multiset of words.
    * ``dropout``: the position is marked, and marked positions are deleted after the visit. If
      every position is marked, one of them, drawn uniformly, is kept: a caption never empties.

    ``rate`` 0 returns ``caption`` exactly as given and draws nothing from ``rng``.
    """
    rate = _check_rate(rate, "caption rate")
    if rate == 0:
        return caption
    words = caption.split()
    if not words:
        return caption
    plan = plan_caption_noise(len(words), rate, rng, ops)
    dropped: list[int] = []
    for position, op in enumerate(plan):
        if op == "replace":
            words[position] = _replacement(words[position], rng, vocabulary)
        elif op == "swap" and len(words) > 1:
            other = position + 1 if position + 1 < len(words) else position - 1
            words[position], words[other] = words[other], words[position]
        elif op == "dropout":
            dropped.append(position)
    if len(dropped) == len(words):
        dropped.pop(int(rng.integers(len(dropped))))
    removed = set(dropped)
    return " ".join(w for i, w in enumerate(words) if i not in removed)


def noisy_image(
    image: Image.Image,
    rate: float,
    rng: np.random.Generator,
    ops: Sequence[str] = IMAGE_OPS,
    gaussian_std: float = 0.5,
    blur_sigma: float = 2.0,
) -> Image.Image:
    """``image`` with every operation in ``ops`` applied at strength ``rate``.

    Applied to the decoded image before the model's transform. The operations run in a fixed order,
    whatever order ``ops`` lists them in:

    1. ``blur``: ``PIL.ImageFilter.GaussianBlur`` with standard deviation ``rate * blur_sigma``
       pixels.
    2. ``gaussian``: independent ``N(0, (rate * gaussian_std)^2)`` noise added to every channel of
       every pixel in [0, 1] units (from ``rng``), clipped to [0, 1] and rounded back to 8 bits.

    Images in modes other than ``L`` and ``RGB`` are converted to ``RGB`` first. ``rate`` 0 returns
    ``image`` itself, pixels untouched, and draws nothing from ``rng``.
    """
    rate = _check_rate(rate, "image rate")
    ops = _check_ops(ops, IMAGE_OPS, "image ops")
    gaussian_std = _check_positive(gaussian_std, "gaussian_std")
    blur_sigma = _check_positive(blur_sigma, "blur_sigma")
    if rate == 0:
        return image
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    for op in IMAGE_OP_ORDER:
        if op not in ops:
            continue
        if op == "blur":
            image = image.filter(ImageFilter.GaussianBlur(radius=rate * blur_sigma))
        else:
            pixels = np.asarray(image, dtype=np.float32) / 255.0
            noise = rng.standard_normal(pixels.shape, dtype=np.float32) * (rate * gaussian_std)
            noisy = np.clip(pixels + noise, 0.0, 1.0)
            image = Image.fromarray(np.rint(noisy * 255.0).astype(np.uint8))
    return image


def noisy_records(
    records: Sequence[Record], config: NoiseConfig | None, vocabulary: Sequence[str]
) -> list[Record]:
    """Records whose captions carry this config's caption noise (images are perturbed on load).

    The key of caption ``j`` of an image is ``(image_id, j)``: the corrupted data set is fixed, the
    same in every epoch, process and run, like a noisy data set would be, which also lets frozen
    towers' features of it go through the feature cache.
    """
    if config is None or config.caption_rate == 0:
        return list(records)
    return [
        replace(
            r,
            captions=tuple(
                config.caption(c, vocabulary, r.image_id, j) for j, c in enumerate(r.captions)
            ),
        )
        for r in records
    ]
