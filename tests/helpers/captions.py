"""Captions for the tests, from the generated dataset's grammar (words the tiny BERT knows)."""

from __future__ import annotations

import numpy as np

from adaptalign.datamodules import generated as g


def some_captions(count: int, seed: int = 1) -> list[str]:
    """``count`` distinct captions of varied length, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    ranking = g.category_ranking(rng)
    captions: list[str] = []
    while len(captions) < count:
        for caption in g.make_captions(rng, g.sample_scene(rng, 3, ranking, 0.0), 5):
            if caption not in captions:
                captions.append(caption)
    return captions[:count]
