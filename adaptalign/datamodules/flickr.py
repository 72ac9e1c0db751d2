"""Readers for the original Flickr8k and Flickr30k caption files (``IMAGE#K<TAB>caption`` lines).

Flickr8k ships its split as three lists of file names; Flickr30k ships none, so it gets a seeded
split. Every malformed line is an error naming the file and line, and images left out of every
split are counted in a warning, because a quietly shrunken split shifts retrieval metrics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from adaptalign.common.checks import is_int
from adaptalign.common.errors import ConfigurationError, DatasetFormatError
from adaptalign.datamodules.records import Record

log = logging.getLogger(__name__)

FLICKR8K_SPLIT_FILES: dict[str, str] = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# The official archive unpacks to the misspelt "Flicker8k_Dataset"; re-packaged copies fix it.
FLICKR8K_IMAGE_FOLDERS = ("Flicker8k_Dataset", "Flickr8k_Dataset")
FLICKR30K_IMAGE_FOLDERS = ("flickr30k-images",)
TOKEN_LAYOUT = "'IMAGE#K<TAB>caption' with K the caption number 0, 1, ..."
SHOWN = 5  # names quoted in a warning or error; enough to find the files, short enough to read

_CAPTION_NUMBER = re.compile(r"[0-9]+")


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, so one bad line cannot flood an error message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """1-based line numbers and lines without line ends; a decoding error names its line."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot read the file ({exc})") from exc
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetFormatError(
                    f"{path}: line {number}: not valid UTF-8 ({exc.reason}); expected UTF-8 text"
                ) from exc
            if number == 1:
                line = line.removeprefix("\ufeff")  # editors on Windows add a byte-order mark
            yield number, line.rstrip("\r\n")


def seeded_split(
    names: Sequence[str], val_images: int, test_images: int, seed: int, source: str
) -> dict[str, str]:
    """Split of each name: a permutation of the sorted names, first val, then test, rest train.

    Sorting first makes the split depend only on the set of names and the seed, not on the order
    a file happens to list them in.
    """
    for setting, size in (("val_images", val_images), ("test_images", test_images)):
        if not is_int(size) or size < 0:
            raise ConfigurationError(f"{setting}={size!r}; expected a count >= 0")
    if val_images + test_images > len(names):
        raise ConfigurationError(
            f"{source}: val_images={val_images} + test_images={test_images} exceed the "
            f"{len(names)} images there are to split; expected at most {len(names)} in all"
        )
    ordered = sorted(names)
    permutation = np.random.default_rng(seed).permutation(len(ordered)).tolist()
    splits: dict[str, str] = {}
    for position, index in enumerate(permutation):
        if position < val_images:
            splits[ordered[index]] = "val"
        elif position < val_images + test_images:
            splits[ordered[index]] = "test"
        else:
            splits[ordered[index]] = "train"
    return splits


def default_image_root(anchor: Path, image_root: str | Path | None, folders: Sequence[str]) -> Path:
    """``image_root`` if given, else the first of ``folders`` found beside ``anchor`` or its folder.

    A missing folder is an error here rather than thousands of "missing image" paths later.
    """
    if image_root is not None:
        return Path(image_root).expanduser().resolve()
    candidates = [base / name for base in (anchor.parent, anchor.parent.parent) for name in folders]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise DatasetFormatError(
        f"{anchor}: no image folder found (looked for {looked}); "
        "expected one of them to exist, or image_root set to the folder holding the images"
    )


def read_tokens(path: Path) -> dict[str, list[str]]:
    """Captions of each image, images in order of first appearance and captions in line order."""
    captions: dict[str, list[str]] = {}
    seen: dict[tuple[str, int], int] = {}
    for number, line in read_lines(path):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        key, tab, caption = line.partition("\t")
        if not tab:
            raise DatasetFormatError(
                f"{where}: got {shorten(line)!r} (no tab); expected {TOKEN_LAYOUT}"
            )
        key = key.strip()
        name, hash_sign, caption_number = key.rpartition("#")
        if not hash_sign or not name:
            raise DatasetFormatError(
                f"{where}: got caption id {shorten(key)!r} (no 'IMAGE#K'); expected {TOKEN_LAYOUT}"
            )
        if not _CAPTION_NUMBER.fullmatch(caption_number):
            raise DatasetFormatError(
                f"{where}: got caption number {shorten(caption_number)!r} in {shorten(key)!r}; "
                f"expected an integer, as in {TOKEN_LAYOUT}"
            )
        caption = caption.strip()
        if not caption:
            raise DatasetFormatError(
                f"{where}: got an empty caption for {key!r}; expected a non-empty caption"
            )
        ident = (name, int(caption_number))
        if ident in seen:
            raise DatasetFormatError(
                f"{where}: got caption id {key!r} again (first on line {seen[ident]}); "
                "expected each IMAGE#K once"
            )
        seen[ident] = number
        captions.setdefault(name, []).append(caption)
    return captions


def _split_paths(
    token_file: Path, split_files: Mapping[str, str | Path | None] | None
) -> dict[str, tuple[Path | None, bool]]:
    """Each split's list file and whether the caller named it (a named file must exist)."""
    given = dict(split_files or {})
    unknown = sorted(set(given) - set(FLICKR8K_SPLIT_FILES))
    if unknown:
        raise ConfigurationError(
            f"split_files has keys {unknown}; expected only {', '.join(FLICKR8K_SPLIT_FILES)}"
        )
    paths: dict[str, tuple[Path | None, bool]] = {}
    for split, default in FLICKR8K_SPLIT_FILES.items():
        if split in given:
            value = given[split]
            paths[split] = (None if value is None else Path(value).expanduser(), True)
        else:
            paths[split] = (token_file.parent / default, False)
    return paths


def _read_split_files(
    token_file: Path,
    captions: Mapping[str, list[str]],
    split_files: Mapping[str, str | Path | None] | None,
) -> dict[str, str]:
    """Split of each listed image, checking every listed image has captions and only one split."""
    splits: dict[str, str] = {}
    where: dict[str, str] = {}
    found = 0
    for split, (path, named) in _split_paths(token_file, split_files).items():
        if path is None:
            log.info("flickr8k: no file given for the %s split; it is empty", split)
            continue
        if not path.is_file():
            if named:
                raise DatasetFormatError(f"{path}: no such file; expected the {split} image list")
            log.warning("flickr8k: %s not found; the %s split is empty", path, split)
            continue
        found += 1
        for number, line in read_lines(path):
            name = line.strip()
            if not name:
                continue
            if name not in captions:
                raise DatasetFormatError(
                    f"{path}: line {number}: got image {shorten(name)!r}, which has no caption "
                    f"in {token_file}; expected only images of the token file"
                )
            if name in splits:
                raise DatasetFormatError(
                    f"{path}: line {number}: got image {name!r} again (already at {where[name]}); "
                    "expected each image in one split, once"
                )
            splits[name] = split
            where[name] = f"{path.name} line {number}"
    if not found:
        raise DatasetFormatError(
            f"{token_file}: none of the split lists was found; expected at least "
            f"{FLICKR8K_SPLIT_FILES['train']} beside it, or split_files naming the lists"
        )
    return splits


def _records(
    captions: Mapping[str, list[str]], splits: Mapping[str, str], root: Path
) -> list[Record]:
    """Records of the images that have a split; ids are positions in the caption file."""
    return [
        Record(image_path=root / name, captions=tuple(texts), image_id=index, split=splits[name])
        for index, (name, texts) in enumerate(captions.items())
        if name in splits
    ]


def read_flickr8k(
    token_file: str | Path,
    image_root: str | Path | None = None,
    split_files: Mapping[str, str | Path | None] | None = None,
) -> list[Record]:
    """Records of ``Flickr8k.token.txt`` split by the official train/dev/test image lists.

    The lists are looked for beside the token file; ``split_files`` maps a split ("train", "val",
    "test") to another list, or to ``None`` for none. An absent list leaves its split empty (the
    test list is often not distributed). Images default to a ``Flicker8k_Dataset`` or
    ``Flickr8k_Dataset`` folder beside the token file or beside its folder.
    """
    token_file = Path(token_file).expanduser()
    captions = read_tokens(token_file)
    splits = _read_split_files(token_file, captions, split_files)
    root = default_image_root(token_file, image_root, FLICKR8K_IMAGE_FOLDERS)
    left_out = [name for name in captions if name not in splits]
    if left_out:
        log.warning(
            "%s: %d of %d captioned images are in no split list and are left out, e.g. %s",
            token_file,
            len(left_out),
            len(captions),
            ", ".join(left_out[:SHOWN]),
        )
    return _records(captions, splits, root)


def read_flickr30k_tokens(
    token_file: str | Path,
    image_root: str | Path | None = None,
    val_images: int = 1000,
    test_images: int = 1000,
    split_seed: int = 0,
) -> list[Record]:
    """Records of ``results_20130124.token`` with a seeded split (the file defines none).

    The sizes default to the usual 1,000 validation and 1,000 test images; the split is not the
    Karpathy one, so numbers are comparable only between runs that share ``split_seed``. Images
    default to a ``flickr30k-images`` folder beside the token file or beside its folder.
    """
    token_file = Path(token_file).expanduser()
    captions = read_tokens(token_file)
    splits = seeded_split(list(captions), val_images, test_images, split_seed, str(token_file))
    root = default_image_root(token_file, image_root, FLICKR30K_IMAGE_FOLDERS)
    return _records(captions, splits, root)
