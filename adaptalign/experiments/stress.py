"""``adaptalign stress``: a trained checkpoint's retrieval at several caption and image noise rates.

    adaptalign stress --config RUN/config.yaml --ckpt_path RUN/checkpoints/best.ckpt \
        --rates 0 0.1 0.2 0.3 0.5 --modality both --output RUN/stress

The checkpoint is evaluated once per rate, with the data module's ``eval_noise`` perturbing
captions (``text``), images (``image``) or both; rate 0 is the clean split. The split is the
validation split, or, when the run selects apart from reporting (``data.selection_images`` or
``data.report_split``), the report split ``test``: ``val`` then is the split the checkpoint was
selected on, and a stress figure is a reported one. The noisy data is fixed for a rate and seed,
so every method meets exactly the same corrupted pairs. Writes ``stress.json``, ``stress.csv``,
``stress.md`` and ``stress.png`` (R@1/5/10 of both directions against the rate), each naming the
split. Any other argument goes to the Lightning CLI, as for ``validate``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adaptalign.common.arguments import CommandParser
from adaptalign.common.atomic_files import atomic_save
from adaptalign.common.errors import ConfigurationError
from adaptalign.common.figures import new_figure, png_bytes
from adaptalign.datamodules.noise import NoiseConfig
from adaptalign.lightning_modules.metric_names import (
    DIRECTIONS,
    KS,
    MEDIAN_RANKS,
    RECALLS,
    RSUM,
    recall_name,
)

DEFAULT_RATES = (0.0, 0.1, 0.2, 0.3, 0.5)
MODALITIES = ("text", "image", "both")
# How the outputs name the split they are on.
SPLIT_WORDS = {"val": "the validation split (val)", "test": "the report split (test)"}


def stressed_split(reports_on: str | None) -> str:
    """The run's report split (``test``: carved by ``data.selection_images`` or set by
    ``data.report_split``) when it has one, since ``val`` then selected the checkpoint and a
    stress figure is a reported one; else ``val`` as before."""
    return reports_on or "val"


def split_words(split: str) -> str:
    """The split as the outputs name it."""
    return SPLIT_WORDS.get(split, f"the {split} split")


def noise_for(rate: float, modality: str, seed: int) -> NoiseConfig | None:
    """The evaluation noise of one rate; ``None`` (clean) at rate 0."""
    if rate == 0:
        return None
    return NoiseConfig(
        caption_rate=rate if modality in ("text", "both") else 0.0,
        image_rate=rate if modality in ("image", "both") else 0.0,
        seed=seed,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="adaptalign stress",
        description="Evaluate a checkpoint at several noise rates (other arguments: the CLI's).",
    )
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint to evaluate")
    parser.add_argument("--rates", type=float, nargs="+", default=list(DEFAULT_RATES))
    parser.add_argument("--modality", choices=MODALITIES, default="both")
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the noise itself")
    parser.add_argument("--output", help="folder for the results (default: beside the checkpoint)")
    return parser


def check_rates(rates: Sequence[float]) -> list[float]:
    for rate in rates:
        if not 0 <= rate <= 1:
            raise ConfigurationError(f"--rates: {rate!r} is not a rate; expected values in [0, 1]")
    return sorted(set(rates))


# Keys a config saved by ``fit`` holds for its subcommand, which a model-and-data parse refuses.
SUBCOMMAND_KEYS = ("ckpt_path", "weights_only")


def without_subcommand_keys(cli_args: list[str], folder: Path) -> list[str]:
    """The arguments with every ``--config`` file stripped of subcommand-only keys.

    So a run's saved ``config.yaml`` can be given as it is.
    """
    import yaml

    out, index = [], 0
    while index < len(cli_args):
        arg = cli_args[index]
        path = None
        if arg == "--config" and index + 1 < len(cli_args):
            path, index = cli_args[index + 1], index + 2
        elif arg.startswith("--config="):
            path, index = arg.split("=", 1)[1], index + 1
        else:
            out.append(arg)
            index += 1
            continue
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"--config {path}: {exc}") from exc
        if isinstance(loaded, dict) and any(k in loaded for k in SUBCOMMAND_KEYS):
            for key in SUBCOMMAND_KEYS:
                loaded.pop(key, None)
            cleaned = folder / f"config{len(out)}_{Path(path).name}"
            cleaned.write_text(yaml.safe_dump(loaded, sort_keys=False))
            path = str(cleaned)
        out += ["--config", path]
    return out


def evaluate(cli_args: list[str], options: argparse.Namespace) -> list[dict[str, Any]]:
    """One evaluation per rate of :func:`stressed_split` with the same model, data and
    checkpoint; each row names its split."""
    from adaptalign.lightning_cli.cli import build_cli

    ckpt = Path(options.ckpt_path)
    if not ckpt.is_file():
        raise ConfigurationError(f"--ckpt_path: {str(ckpt)!r} does not exist")
    rates = check_rates(options.rates)
    # No logger: the stress test writes its own files and must not add versions to the run.
    with tempfile.TemporaryDirectory() as folder:
        args = without_subcommand_keys(cli_args, Path(folder))
        cli = build_cli([*args, "--trainer.logger=false"], run=False)
    split = stressed_split(cli.datamodule.reports_on)
    run = cli.trainer.test if split == "test" else cli.trainer.validate
    rows = []
    for rate in rates:
        cli.datamodule.eval_noise = noise_for(rate, options.modality, options.noise_seed)
        print(f"rate {rate:g} ({options.modality}) on {split_words(split)}", file=sys.stderr)
        results = run(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt), verbose=False)[0]
        row: dict[str, Any] = {"rate": rate, "modality": options.modality, "split": split}
        row.update({k.removeprefix(f"{split}/"): float(v) for k, v in results.items()})
        rows.append(row)
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["rate", *(m.replace("_", " ") for m in RECALLS), RSUM]
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    for row in rows:
        cells = [f"{row['rate']:g}", *(f"{row[m]:.1f}" for m in (*RECALLS, RSUM))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], title: str) -> bytes:
    """R@1/5/10 against the noise rate, one panel per direction."""
    figure = new_figure(9, 3.6)
    rates = [row["rate"] for row in rows]
    labels = ("image→text", "text→image")
    for index, (direction, label) in enumerate(zip(DIRECTIONS, labels, strict=True)):
        axes = figure.add_subplot(1, 2, index + 1)
        for k in KS:
            recall = [row[recall_name(direction, k)] for row in rows]
            axes.plot(rates, recall, marker="o", label=f"R@{k}")
        axes.set_xlabel("noise rate")
        axes.set_ylabel("recall (%)")
        axes.set_title(label)
        axes.set_ylim(0, 100)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return png_bytes(figure, dpi=100)


def write(rows: Sequence[dict[str, Any]], output: Path, modality: str) -> None:
    import csv
    import io

    output.mkdir(parents=True, exist_ok=True)
    atomic_save(output / "stress.json", json.dumps(list(rows), indent=2) + "\n")
    split = rows[0].get("split", "val") if rows else "val"
    fields = ["rate", "modality", "split", *RECALLS, RSUM, *MEDIAN_RANKS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_save(output / "stress.csv", buffer.getvalue())
    atomic_save(
        output / "stress.md",
        f"# Noise stress test ({modality})\n\nRetrieval on {split_words(split)} in %.\n\n"
        + table(rows),
    )
    atomic_save(output / "stress.png", plot(rows, f"{split} retrieval under {modality} noise"))


def main(argv: Sequence[str] | None = None) -> int:
    options, cli_args = build_parser().parse_known_args(argv)
    rows = evaluate(cli_args, options)
    output = Path(options.output or Path(options.ckpt_path).parent / f"stress_{options.modality}")
    write(rows, output, options.modality)
    print(table(rows), end="")
    print(f"wrote {output}/stress.{{json,csv,md,png}}")
    return 0
