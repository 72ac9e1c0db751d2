"""``adaptalign fit|validate|test|predict --config ...``: the Lightning CLI over system and data.

Also ``adaptalign compare`` (methods over seeds and sizes), ``adaptalign stress`` (a checkpoint
under noise) and ``adaptalign tsne`` (a t-SNE view of a ``predict`` embedding file).

Every run saves its resolved config beside its TensorBoard logs, logs learning rates, keeps the best
checkpoint by validation rsum plus the last one, and ``predict`` writes embeddings to a file.
Settings that cannot work end the command with one clear message rather than a deep traceback.
"""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from adaptalign import compare, stress_test
from adaptalign.callbacks import tsne_view
from adaptalign.callbacks.embedding_writer import EmbeddingWriter
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.records import DatasetFormatError
from adaptalign.errors import ConfigurationError, NonFiniteLossError
from adaptalign.lightning_modules.system import AlignmentModule


def trainer_defaults() -> dict:
    """Fresh callback instances per run, so repeated runs in one process never share state."""
    return {
        "default_root_dir": "runs",
        "callbacks": [
            LearningRateMonitor(logging_interval="step"),
            ModelCheckpoint(
                monitor="val/rsum", mode="max", save_last=True, filename="best-{epoch}-{step}"
            ),
            EmbeddingWriter(),
        ],
    }


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(
        AlignmentModule,
        AlignmentDataModule,
        args=args,
        run=run,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "adaptalign"},
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point; user errors print ``adaptalign: error: ...`` and exit with status 2."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["compare"]:
        return compare.main(argv[1:])
    if argv[:1] == ["stress"]:
        raise SystemExit(stress_test.main(argv[1:]))
    if argv[:1] == ["tsne"]:
        raise SystemExit(tsne_view.main(argv[1:]))
    # Frozen towers are in eval mode on purpose; say so once in the docs, not at every run.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    try:
        build_cli(args)
    except (ConfigurationError, DatasetFormatError) as exc:
        print(f"adaptalign: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    except NonFiniteLossError as exc:
        print(f"adaptalign: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
