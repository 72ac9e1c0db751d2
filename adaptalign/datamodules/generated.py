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
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from adaptalign.common.checks import is_finite_number, is_int
from adaptalign.common.errors import ConfigurationError
from adaptalign.common.progress import progress_bar, say
from adaptalign.datamodules.generated_drawing import render
from adaptalign.datamodules.generated_scenes import (
    SceneObject,
    category_ranking,
    hard_negative,
    make_captions,
    sample_scene,
)
from adaptalign.datamodules.karpathy import write_karpathy

FORMAT_VERSION = 1  # bump whenever the same config would produce different files
DATASET_FILE = "dataset_generated.json"
IMAGE_FOLDER = "images"


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


def default_cache_dir() -> Path:
    """``$ADAPTALIGN_CACHE`` if set, else ``~/.cache/adaptalign``."""
    configured = os.environ.get("ADAPTALIGN_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "adaptalign"


def validate_config(config: GeneratedConfig) -> None:
    """Reject settings that cannot produce a usable dataset, naming the field and the rule."""
    rules = {
        "num_train": (lambda v: is_int(v) and v > 0, "a positive integer"),
        "num_val": (lambda v: is_int(v) and v > 0, "a positive integer"),
        # 0: train and val only, like Flickr8k as distributed (see data.selection_images)
        "num_test": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
        "image_size": (lambda v: is_int(v) and v >= 32, "an integer >= 32"),
        "max_objects": (lambda v: is_int(v) and 1 <= v <= 4, "an integer from 1 to 4"),
        "zipf_exponent": (lambda v: is_finite_number(v) and v >= 0, "a finite number >= 0"),
        "hard_negative_rate": (
            lambda v: is_finite_number(v) and 0 <= v <= 1,
            "a number from 0 to 1",
        ),
        "captions_per_image": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        "seed": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
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
