"""Caption and image noise: reproducibility, identities at rate 0, and the documented semantics."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.noise import (
    NoiseConfig,
    caption_vocabulary,
    noisy_caption,
    noisy_image,
    plan_caption_noise,
    rng_for,
)

CAPTION = "a small red circle above a large blue square near the left edge"
VOCABULARY = ["apple", "banana", "cherry", "grape", "lemon", "mango"]


def grey(size: int = 64, value: int = 128) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8))


def checkerboard(size: int = 32) -> Image.Image:
    """One-pixel black/white squares: all its energy is at the highest spatial frequency."""
    ys, xs = np.indices((size, size))
    return Image.fromarray(((ys + xs) % 2 * 255).astype(np.uint8))


def high_frequency_energy(image: Image.Image) -> float:
    """Mean squared difference between horizontal neighbours, in [0, 1] pixel units."""
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    return float(np.mean(np.diff(pixels, axis=1) ** 2))


def test_rng_for_depends_only_on_seed_and_key() -> None:
    first = rng_for(3, 1, 7, 2).random(4)
    assert np.array_equal(first, rng_for(3, 1, 7, 2).random(4))
    assert not np.array_equal(first, rng_for(3, 1, 7, 3).random(4))
    assert not np.array_equal(first, rng_for(4, 1, 7, 2).random(4))
    assert np.array_equal(first, np.random.default_rng([3, 1, 7, 2]).random(4))


def test_caption_noise_is_reproducible_and_key_dependent() -> None:
    def noisy(seed: int, *key: int) -> str:
        return noisy_caption(CAPTION, 0.5, rng_for(seed, *key), vocabulary=VOCABULARY)

    assert noisy(0, 1, 2, 3) == noisy(0, 1, 2, 3)
    outputs = {noisy(0, 1, 2, c) for c in range(5)} | {noisy(s, 1, 2, 0) for s in range(1, 5)}
    assert len(outputs) == 9  # 13 words at rate 0.5: distinct keys and seeds give distinct noise
    assert noisy(0, 1, 2, 3) != CAPTION


def test_config_streams_make_caption_and_image_noise_reproducible() -> None:
    config = NoiseConfig(caption_rate=0.5, image_rate=0.3, gaussian_std=0.1, seed=5)
    assert config.caption(CAPTION, VOCABULARY, 0, 9, 1) == config.caption(
        CAPTION, VOCABULARY, 0, 9, 1
    )
    assert config.caption(CAPTION, VOCABULARY, 0, 9, 1) != config.caption(
        CAPTION, VOCABULARY, 1, 9, 1
    )
    same = [np.asarray(config.image(grey(16), 0, 9)) for _ in range(2)]
    assert np.array_equal(same[0], same[1])
    assert not np.array_equal(same[0], np.asarray(config.image(grey(16), 1, 9)))
    other_seed = NoiseConfig(caption_rate=0.5, image_rate=0.3, gaussian_std=0.1, seed=6)
    assert not np.array_equal(same[0], np.asarray(other_seed.image(grey(16), 0, 9)))


def test_rate_zero_is_the_identity() -> None:
    rng = np.random.default_rng(0)
    odd = "  Two   spaces,\tand a tab "
    assert noisy_caption(odd, 0.0, rng, vocabulary=VOCABULARY) == odd
    image = checkerboard()
    assert noisy_image(image, 0.0, rng) is image
    assert np.array_equal(np.asarray(noisy_image(image, 0.0, rng)), np.asarray(checkerboard()))
    assert rng.bit_generator.state == np.random.default_rng(0).bit_generator.state  # no draws
    config = NoiseConfig()
    assert not config.active
    assert config.caption(odd, VOCABULARY, 0, 1) == odd
    assert config.image(image, 0, 1) is image
    assert NoiseConfig(image_rate=0.1).active and NoiseConfig(caption_rate=0.1).active


@pytest.mark.parametrize("seed", range(20))
def test_full_dropout_keeps_exactly_one_original_word(seed: int) -> None:
    out = noisy_caption(CAPTION, 1.0, np.random.default_rng(seed), ("dropout",), VOCABULARY)
    assert len(out.split()) == 1
    assert out in CAPTION.split()


def test_dropout_at_rate_deletes_the_planned_positions() -> None:
    words = [f"w{i}" for i in range(40)]
    out = noisy_caption(" ".join(words), 0.3, rng_for(0, 1), ("dropout",), VOCABULARY)
    plan = plan_caption_noise(40, 0.3, rng_for(0, 1), ("dropout",))
    assert out.split() == [w for w, op in zip(words, plan, strict=True) if op is None]
    assert 0 < plan.count("dropout") < 40


def test_affected_fraction_matches_the_rate() -> None:
    # 20,000 positions: the fraction's standard deviation is sqrt(r (1 - r) / n) <= 0.0036, so a
    # tolerance of 0.015 is over 4 standard deviations for every rate below.
    n = 20_000
    for rate in (0.1, 0.3, 0.7):
        plan = plan_caption_noise(n, rate, np.random.default_rng(1), ("dropout", "swap", "replace"))
        assert sum(op is not None for op in plan) / n == pytest.approx(rate, abs=0.015)
        counts = Counter(op for op in plan if op is not None)
        for op in ("dropout", "swap", "replace"):  # ops uniform among affected words
            assert counts[op] / (rate * n) == pytest.approx(1 / 3, abs=0.03)
    # The same through the caption: with replace only, exactly the affected words change.
    words = [f"w{i}" for i in range(n)]
    out = noisy_caption(" ".join(words), 0.3, np.random.default_rng(2), ("replace",), VOCABULARY)
    changed = sum(a != b for a, b in zip(words, out.split(), strict=True))
    assert changed / n == pytest.approx(0.3, abs=0.015)


def test_swap_preserves_the_words() -> None:
    for seed in range(20):
        out = noisy_caption(CAPTION, 0.6, np.random.default_rng(seed), ("swap",), VOCABULARY)
        assert Counter(out.split()) == Counter(CAPTION.split())
    assert noisy_caption("alone", 1.0, np.random.default_rng(0), ("swap",)) == "alone"


def test_single_swap_trades_with_the_next_word_and_last_with_previous() -> None:
    class Scripted:
        """Affects only the given position; every op index is 0 (the only op)."""

        def __init__(self, position: int) -> None:
            self.position = position

        def random(self, n: int) -> np.ndarray:
            return np.where(np.arange(n) == self.position, 0.0, 1.0)

        def integers(self, high: int, size: int | None = None) -> np.ndarray:
            return np.zeros(size, dtype=np.int64)

    rng = Scripted(1)
    assert noisy_caption("a b c d", 0.5, rng, ("swap",)) == "a c b d"  # type: ignore[arg-type]
    rng = Scripted(3)
    assert noisy_caption("a b c d", 0.5, rng, ("swap",)) == "a b d c"  # type: ignore[arg-type]


def test_replace_draws_other_words_from_the_vocabulary() -> None:
    caption = "apple banana cherry grape lemon mango"
    for seed in range(20):
        out = noisy_caption(caption, 1.0, np.random.default_rng(seed), ("replace",), VOCABULARY)
        new = out.split()
        assert len(new) == 6
        assert all(w in VOCABULARY for w in new)
        assert all(a != b for a, b in zip(caption.split(), new, strict=True))
    # With no other vocabulary word available the word stays.
    rng = np.random.default_rng(0)
    assert noisy_caption("Apple", 1.0, rng, ("replace",), ["apple"]) == "Apple"
    assert noisy_caption("apple", 1.0, rng, ("replace",), []) == "apple"


def test_replace_is_uniform_over_the_other_words() -> None:
    rng = np.random.default_rng(3)
    counts = Counter(
        noisy_caption("cherry", 1.0, rng, ("replace",), VOCABULARY) for _ in range(5000)
    )
    assert set(counts) == set(VOCABULARY) - {"cherry"}
    # 5 words, 1000 expected each; binomial std ~ 28, tolerance 120 is over 4 std.
    assert all(abs(c - 1000) < 120 for c in counts.values())


def test_caption_vocabulary_is_sorted_distinct_and_lower_cased() -> None:
    captions = ["The dog, the CAT.", "a dog: runs", "  "]
    assert caption_vocabulary(captions) == ["a", "cat", "dog", "runs", "the"]
    assert caption_vocabulary(reversed(captions)) == caption_vocabulary(captions)


def test_gaussian_noise_has_the_rate_scaled_std() -> None:
    # Mid grey and std 0.05 keep clipping 10 std away. 64*64*3 = 12,288 values: the sample std's
    # relative error is about 1/sqrt(2n) = 0.64%, so 3% is over 4 standard errors.
    for rate in (0.25, 0.5, 1.0):
        out = noisy_image(grey(), rate, np.random.default_rng(0), ("gaussian",), gaussian_std=0.1)
        pixels = np.asarray(out, dtype=np.float64) / 255.0
        assert out.mode == "RGB" and out.size == (64, 64)
        assert pixels.std() == pytest.approx(rate * 0.1, rel=0.03)
        assert pixels.mean() == pytest.approx(128 / 255, abs=0.003)


def test_gaussian_noise_clips_to_the_pixel_range() -> None:
    black = grey(value=0)
    out = np.asarray(noisy_image(black, 1.0, np.random.default_rng(0), ("gaussian",), 0.5))
    # Negative draws clip to 0: about half the values stay exactly black.
    assert out.min() == 0
    assert (out == 0).mean() == pytest.approx(0.5, abs=0.03)


def test_blur_removes_high_frequencies_and_rate_scales_it() -> None:
    board = checkerboard()
    before = high_frequency_energy(board)
    assert before == pytest.approx(1.0)
    energies = []
    for rate in (0.25, 0.5, 1.0):
        out = noisy_image(board, rate, np.random.default_rng(0), ("blur",), blur_sigma=2.0)
        assert out.mode == "L"
        energies.append(high_frequency_energy(out))
    assert energies[0] < 0.5 * before
    assert energies[2] < 0.01 * before
    assert energies[0] > energies[1] > energies[2]


def test_blur_runs_before_noise_whatever_the_order() -> None:
    image = checkerboard()
    a = noisy_image(image, 0.5, rng_for(0, 1), ("gaussian", "blur"), 0.1, 2.0)
    b = noisy_image(image, 0.5, rng_for(0, 1), ("blur", "gaussian"), 0.1, 2.0)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # After a strong blur the board is flat grey, so the remaining spread is the added noise.
    assert (np.asarray(a) / 255.0).std() == pytest.approx(0.05, rel=0.15)


def test_other_image_modes_become_rgb() -> None:
    rgba = Image.new("RGBA", (8, 8), (128, 128, 128, 255))
    out = noisy_image(rgba, 0.5, np.random.default_rng(0), ("gaussian",), 0.1)
    assert out.mode == "RGB"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"caption_rate": 1.5}, r"noise\.caption_rate=1\.5; expected a number in \[0, 1\]"),
        ({"image_rate": -0.1}, r"noise\.image_rate=-0\.1; expected a number in \[0, 1\]"),
        ({"caption_rate": True}, r"noise\.caption_rate=True"),
        ({"caption_ops": ("dropout", "shuffle")}, r"noise\.caption_ops=.*dropout, swap, replace"),
        ({"caption_ops": ()}, r"noise\.caption_ops=\[\]; expected a non-empty list"),
        ({"caption_ops": ("swap", "swap")}, r"noise\.caption_ops=.*distinct"),
        ({"image_ops": ("gaussian", "jpeg")}, r"noise\.image_ops=.*gaussian, blur"),
        ({"image_ops": "blur"}, r"noise\.image_ops='blur'; expected a list"),
        ({"gaussian_std": 0.0}, r"noise\.gaussian_std=0\.0; expected a number > 0"),
        ({"blur_sigma": -1.0}, r"noise\.blur_sigma=-1\.0; expected a number > 0"),
        ({"seed": -1}, r"noise\.seed=-1; expected an integer >= 0"),
    ],
)
def test_invalid_config_names_the_setting(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        NoiseConfig(**kwargs)


def test_config_accepts_lists_and_exposes_tuples() -> None:
    config = NoiseConfig(caption_ops=["swap"], image_ops=["blur"])  # type: ignore[arg-type]
    assert config.caption_ops == ("swap",) and config.image_ops == ("blur",)


def test_functions_refuse_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigurationError, match="caption ops"):
        noisy_caption(CAPTION, 0.5, rng, ("scramble",), VOCABULARY)
    with pytest.raises(ConfigurationError, match="image rate"):
        noisy_image(grey(4), 2.0, rng)
