"""``adaptalign fit|validate|test|predict --config ...``: the Lightning CLI over system and data.

Every run saves its resolved config beside its TensorBoard logs, logs learning rates, keeps the best
checkpoint by validation rsum plus the last one (each written whole or not at all, so a killed run
never leaves a truncated checkpoint), and ``predict`` writes embeddings to a file. With a selection
split (``data.selection_images``) ``fit`` selects on it and ends by evaluating the selected
checkpoint once on the report split (``test``); so does ``data.report_split: test`` for a data set
with a test split of its own.
Settings that cannot work end the command with one clear message rather than a deep traceback.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_only

from adaptalign.callbacks.cluster_plot import ClusterSizePlot
from adaptalign.callbacks.collapse_watch import CollapseWatch
from adaptalign.callbacks.embedding_writer import EmbeddingWriter
from adaptalign.callbacks.final_report import FinalReport
from adaptalign.callbacks.model_inputs import ModelInputsLink
from adaptalign.callbacks.parameter_summary import with_parameter_summary
from adaptalign.callbacks.run_summary import RunSummary
from adaptalign.callbacks.stream_counts import StreamCounts
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.lightning_cli.checkpoint_settings import warn_replaced_settings
from adaptalign.lightning_cli.checks import CheckedCLI, command_settings
from adaptalign.lightning_cli.methods import add_method_arguments, method_callbacks
from adaptalign.lightning_cli.run_folder import EVALUATIONS, command_logger
from adaptalign.lightning_modules.checkpoint_io import AtomicCheckpointIO
from adaptalign.lightning_modules.metric_names import RSUM
from adaptalign.lightning_modules.system import AlignmentModule

ATOMIC_CHECKPOINT_IO = "adaptalign.lightning_modules.checkpoint_io.AtomicCheckpointIO"


def trainer_defaults() -> dict:
    """Fresh callback instances per run, so repeated runs in one process never share state.

    The checkpoint plugin is given by class path, so the saved ``config.yaml`` names it.
    """
    return {
        "default_root_dir": "runs",
        "callbacks": [
            LearningRateMonitor(logging_interval="step"),
            ModelCheckpoint(monitor=f"val/{RSUM}", mode="max", filename="best-{epoch}-{step}"),
            # Its own callback: Lightning >= 2.6 writes ``save_last`` only when a best checkpoint is
            # saved at the same step, which would leave last.ckpt at the best epoch, not the last.
            ModelCheckpoint(filename="last", enable_version_counter=False),
            EmbeddingWriter(),
            FinalReport(),
            CollapseWatch(),
            # Glue between system and data: the system's inputs, the caption clusters' plot.
            ModelInputsLink(),
            ClusterSizePlot(),
            StreamCounts(),
        ],
        "plugins": [{"class_path": ATOMIC_CHECKPOINT_IO}],
    }


def with_atomic_checkpoints(plugins: object) -> object:
    """The trainer's plugins, plus atomic checkpoint writing unless they bring a CheckpointIO.

    Users who pass their own plugins (a precision or cluster plugin, say) replace the default
    list; they keep atomic checkpoints, and one who chooses another CheckpointIO keeps that.
    """
    if plugins is None:
        given: list = []
    elif isinstance(plugins, list | tuple):
        given = list(plugins)
    else:
        given = [plugins]
    if any(isinstance(p, CheckpointIO) for p in given):
        return plugins
    return [*given, AtomicCheckpointIO()]


def selected_checkpoint(trainer: Trainer) -> str | None:
    """The best checkpoint by ``val/rsum``; ``None`` (the model as fit left it, i.e. the last
    epoch) when no checkpoint callback monitors it or none was saved (``fast_dev_run``)."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "monitor", None) == f"val/{RSUM}" and callback.best_model_path:
            return callback.best_model_path
    return None


def brings_checkpoint_io(strategy: object) -> bool:
    """Whether a strategy object was given its own CheckpointIO (one a user chose is kept)."""
    if not isinstance(strategy, Strategy):
        return False
    return type(strategy.checkpoint_io) is not TorchCheckpointIO


class AlignmentCLI(CheckedCLI):
    """The Lightning CLI, with atomic checkpoint writing whatever plugins the user gives, a folder
    of its own for every run (see ``run_folder``) and the settings a checkpoint replaces named."""

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # FinalReport prints the metrics rounded instead of Lightning's table
            self.parser.set_defaults({"validate.verbose": False, "test.verbose": False})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_method_arguments(parser)

    def parse_arguments(self, parser: object, args: object) -> None:
        super().parse_arguments(parser, args)
        # Kept before Lightning replaces them with the model settings saved in --ckpt_path.
        self.given_model = copy.deepcopy(command_settings(self.config).model)

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        settings = command_settings(self.config)
        ckpt_path = settings.get("ckpt_path")
        if ckpt_path and rank_zero_only.rank == 0:
            warn_replaced_settings(ckpt_path, self.given_model, settings.get("model"))
        if self.subcommand in EVALUATIONS:  # its checkpoint callbacks' folders are not this run's
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
        elif ckpt_path:  # a run resumed in its own folder finds its checkpoints there
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* is not empty")

    def instantiate_trainer(self, **kwargs: object) -> Trainer:
        settings_init = command_settings(self.config_init)
        trainer_config = settings_init.get("trainer", {})
        if not brings_checkpoint_io(trainer_config.get("strategy")):
            kwargs["plugins"] = with_atomic_checkpoints(trainer_config.get("plugins"))
        # The methods run before the config's other callbacks, in METHODS order.
        given = trainer_config.get("callbacks") or []
        given = list(given) if isinstance(given, list | tuple) else [given]
        callbacks = [*method_callbacks(settings_init), *given]
        kwargs.update(with_parameter_summary(trainer_config, callbacks))
        settings = command_settings(self.config)
        logger = command_logger(self.subcommand, settings.get("trainer"), settings.get("ckpt_path"))
        if logger is not None:
            kwargs["logger"] = logger
        return super().instantiate_trainer(**kwargs)

    def reports_after_fit(self) -> bool:
        """Whether the data has a report split (a carved selection split, or
        ``data.report_split: test``), so fit is reported on ``test`` once."""
        return getattr(self.datamodule, "reports_on", None) is not None

    def before_fit(self) -> None:
        """The summary and the final table wait for the report evaluation, when one follows."""
        if self.reports_after_fit():
            for callback in self.trainer.callbacks:
                if isinstance(callback, RunSummary | FinalReport):
                    callback.report_follows = True

    def after_fit(self) -> None:
        """Evaluate the checkpoint selected on ``val`` (the selection split) once on ``test``
        (the report split): nothing reads the report split before the selection is final."""
        if not self.reports_after_fit():
            return
        self.trainer.test(
            self.model,
            datamodule=self.datamodule,
            ckpt_path=selected_checkpoint(self.trainer),
            verbose=False,
        )


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return AlignmentCLI(
        AlignmentModule,
        AlignmentDataModule,
        args=args,
        run=run,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "adaptalign"},
    )


def without_tips(record: logging.LogRecord) -> bool:
    """Drops Lightning's advertisements for its cloud services (``💡 Tip: ...``) from the output."""
    return not record.getMessage().startswith("💡 Tip")


def main(args: list[str]) -> None:
    """``fit``, ``validate``, ``test`` or ``predict`` and its options (``adaptalign.cli`` turns
    errors into its one-line messages)."""
    # Frozen towers are in eval mode on purpose; say so once in the docs, not at every run.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(without_tips)
    # From the console Lightning reads the command line itself (given it again, it warns).
    build_cli(None if args == sys.argv[1:] else args)
