"""Bad command lines end in one line that names the file or setting and what was expected.

Left to jsonargparse and Lightning, three kinds of mistake end in long output instead:

- a misspelt setting (``model.embed_dimm``) or a value of the wrong type prints the whole
  89-line usage; here it is one line naming the config file that holds it and the closest valid
  setting (``difflib``, over the keys the parser accepts);
- a value a callback refuses (MM-TS with ``alpha/2 >= shift_min``) reaches the user as an 81-line
  trace, because jsonargparse builds callbacks while trying each type of a ``Union`` and wraps the
  refusal in a ``ValueError``; here the refusal is found in the exception chain and shown alone;
- a ``--ckpt_path`` that is missing, truncated or not a checkpoint fails only after the data has
  been set up and the features extracted, and for the last two without naming the path; here it
  is loaded (memory-mapped, so nothing is read but the index and the pickled structure) right
  after parsing, before any class is built.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from fsspec.core import strip_protocol
from fsspec.implementations.local import LocalFileSystem
from jsonargparse import ActionSubCommands, ArgumentError, ArgumentParser, Namespace
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from adaptalign.common.errors import ConfigurationError, DatasetFormatError

# Values Lightning resolves itself rather than reading them as paths (``registry`` in any case).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


class SubcommandParser(LightningArgumentParser):
    """Keeps its subcommand parsers, so a misspelt key can be matched against the valid ones."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.subcommand_parsers: Mapping[str, ArgumentParser] = {}

    def add_subcommands(self, *args: Any, **kwargs: Any) -> ActionSubCommands:
        action = super().add_subcommands(*args, **kwargs)
        self.subcommand_parsers = action.choices  # filled as the subcommands are added
        return action


def command_settings(config: Namespace) -> Namespace:
    """The settings of the config's subcommand (``fit``, ...), or the config itself without one."""
    command = config.get("subcommand")
    return config[command] if command else config


class CheckedCLI(LightningCLI):
    """The Lightning CLI, with the three checks above; they raise :class:`ConfigurationError`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", SubcommandParser)
        kwargs["parser_kwargs"] = {"exit_on_error": False, **(kwargs.get("parser_kwargs") or {})}
        try:
            super().__init__(*args, **kwargs)
        except ArgumentError as exc:  # the given arguments parsed; those saved in --ckpt_path not
            config = getattr(self, "config", None)
            command = config.get("subcommand") if config else None
            ckpt_path = config[command].get("ckpt_path") if command else None
            if not ckpt_path:
                raise
            line = parse_error_line(exc, self.parser, [command])
            raise ConfigurationError(
                f"--ckpt_path {str(ckpt_path)!r}: the model settings saved in it do not fit: {line}"
            ) from exc

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse errors as one line; then ``--ckpt_path``, before Lightning reads its settings."""
        given = sys.argv[1:] if args is None else args
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            argv = [str(a) for a in given] if isinstance(given, list | tuple) else []
            raise ConfigurationError(parse_error_line(exc, parser, argv)) from exc
        check_ckpt_path(command_settings(self.config).get("ckpt_path"))

    def instantiate_classes(self) -> None:
        """A refusal raised while jsonargparse builds a class, without jsonargparse's wrapping."""
        try:
            super().instantiate_classes()
        except ValueError as exc:
            refusal = refusal_in(exc)
            if refusal is None or refusal is exc:
                raise
            raise type(refusal)(str(refusal)) from exc


def refusal_in(exc: BaseException | None) -> BaseException | None:
    """The project's own error somewhere in ``exc``'s chain of causes, or ``None``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigurationError | DatasetFormatError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


# ----------------------------------------------------------------------------- --ckpt_path


def check_ckpt_path(ckpt_path: str | Path | None) -> None:
    """Raise unless ``ckpt_path`` is a Lightning special value, remote, a folder, or a checkpoint.

    Loaded the way Lightning's command line first loads it (``weights_only=True``), with the
    tensors memory-mapped. Sharded checkpoints are folders and remote ones are left to Lightning.
    """
    if ckpt_path is None:
        return
    text = str(ckpt_path)
    if text in SPECIAL_CKPT_PATHS or text.lower().partition(":")[0] == "registry":
        return
    if not isinstance(get_filesystem(text), LocalFileSystem):
        return
    path = Path(strip_protocol(text))
    where = f"--ckpt_path {text!r}"
    expected = "expected a .ckpt file written by adaptalign fit, or last, best or hpc"
    if not path.exists():
        raise ConfigurationError(f"{where}: no such file; {expected}")
    if path.is_dir():
        return
    try:
        with path.open("rb") as file:  # torch.save's format, a zip whose index is at the very end
            is_zip = zipfile.is_zipfile(file)
    except OSError as exc:
        raise ConfigurationError(f"{where}: cannot be read ({exc.strerror or exc})") from exc
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as exc:  # any of pickle's, zip's or torch's own, depending on the damage
        reason = load_failure(exc) if is_zip else "truncated, or not a file torch.save wrote"
        raise ConfigurationError(
            f"{where}: not a Lightning checkpoint ({reason}); {expected}"
        ) from exc
    if not isinstance(saved, Mapping) or "state_dict" not in saved:
        if isinstance(saved, Mapping):
            held = f"keys {sorted(map(str, saved))[:5]}"
        else:
            held = f"a {type(saved).__name__}"
        raise ConfigurationError(
            f"{where}: not a Lightning checkpoint (no 'state_dict'; it holds {held}); {expected}"
        )


def load_failure(exc: BaseException) -> str:
    """The part of a ``torch.load`` error that says what is wrong, not how to load unsafely."""
    text = " ".join(str(exc).split())
    _, found, detail = text.partition("WeightsUnpickler error:")
    if found:
        detail = detail.split(" Please use")[0].split(" Check the documentation")[0]
        return f"a weights-only load refuses it: {detail.strip()}"
    return text or type(exc).__name__


# ----------------------------------------------------------------------------- parse errors


def parse_error_line(exc: ArgumentError, parser: ArgumentParser, argv: Sequence[str]) -> str:
    """One line for a failed parse: where the setting was given, what is wrong, a close key."""
    refusal = refusal_in(exc)
    if refusal is not None:
        return str(refusal)
    message = str(exc)
    if match := re.match(r"unrecognized arguments: --([^\s=]+)", message):
        return unknown_line(match.group(1), valid_keys(command_parser(parser, argv)), argv)
    key, candidates = unknown_key(message, parser, argv)
    if key is not None:
        return unknown_line(key, candidates, argv)
    if match := re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.DOTALL):
        key, reason = match.groups()
        origin = source(key, argv)
        if origin is None or origin.startswith("--"):
            return f"{origin or key}: {first_error(reason)}"
        return f"{origin}: {key}: {first_error(reason)}"
    return " ".join(message.split())


def unknown_line(key: str, candidates: Iterable[str], argv: Sequence[str]) -> str:
    """``FILE: unknown setting 'KEY'; did you mean 'VALID'?`` (``--KEY`` as given on the line)."""
    close = difflib.get_close_matches(plain_key(key), list(candidates), n=1, cutoff=0.75)
    origin = source(key, argv)
    if origin is not None and origin.startswith("--"):
        hint = f"; did you mean --{close[0]}?" if close else "; see --help for the valid ones"
        return f"unknown option {origin}{hint}"
    hint = f"; did you mean {close[0]!r}?" if close else "; see --help for the valid ones"
    return f"{origin + ': ' if origin else ''}unknown setting {key!r}{hint}"


def command_parser(parser: ArgumentParser, argv: Sequence[str]) -> ArgumentParser:
    """The parser of the subcommand in ``argv`` (``fit``, ...), or ``parser`` itself."""
    parsers: Mapping[str, ArgumentParser] = getattr(parser, "subcommand_parsers", {})
    return next((parsers[arg] for arg in argv if arg in parsers), parser)


def valid_keys(parser: ArgumentParser) -> list[str]:
    """Every dotted key the parser accepts (a ``Namespace``'s ``keys()`` are the nested ones)."""
    defaults = parser.get_defaults(skip_validation=True)
    return [key for key in defaults.keys() if key != "config"]  # noqa: SIM118


def unknown_key(
    message: str, parser: ArgumentParser, argv: Sequence[str]
) -> tuple[str | None, list[str]]:
    """The misspelt key a jsonargparse message names, and the keys it may have meant."""
    if match := re.match(r"Subcommand '[^']+' does not accept option '([^']+)'", message):
        return match.group(1), valid_keys(command_parser(parser, argv))
    nested = re.match(r'Parser key "([^"]+)":', message)
    option = re.search(r"Option '([^']+)' is not accepted", message)
    if nested and option:
        parent = nested.group(1)
        owner = re.search(r"Problem with given class_path '([^']+)'", message)
        names = init_parameters(owner.group(1)) if owner else []
        return f"{parent}.{option.group(1)}", [f"{parent}.{name}" for name in names]
    return None, []


def init_parameters(class_path: str) -> list[str]:
    """The settings a class takes (its ``__init__`` parameters), or none if it cannot be found."""
    module, _, name = class_path.rpartition(".")
    try:
        owner = getattr(importlib.import_module(module), name)
        return list(inspect.signature(owner).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def first_error(reason: str) -> str:
    """The first of jsonargparse's ``Errors:`` (one per type tried), else the whole reason."""
    if "Errors:" in reason:
        listed = reason.split("Errors:", 1)[1].strip().removeprefix("- ")
        return " ".join(re.split(r"\n\s*- ", listed)[0].split())
    return " ".join(reason.split())


# ----------------------------------------------------------------------------- where a key is set


def source(key: str, argv: Sequence[str]) -> str | None:
    """Where ``key`` was last set: the option as typed (``--model.x``), a config file, or ``None``.

    The command line wins over config files, and a later ``--config`` over an earlier one.
    """
    wanted = plain_key(key)
    for arg in reversed(argv):
        option = arg.split("=", 1)[0]
        if option.startswith("--") and plain_key(option[2:]) == wanted:
            return option
    for config in reversed(config_files(argv)):
        try:
            tree = yaml.safe_load(Path(config).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if wanted in setting_keys(tree):
            return config
    return None


def config_files(argv: Sequence[str]) -> list[str]:
    """The files given with ``--config``/``-c``, in order."""
    files = []
    for number, arg in enumerate(argv):
        if arg in ("--config", "-c") and number + 1 < len(argv):
            files.append(argv[number + 1])
        elif arg.startswith("--config="):
            files.append(arg.removeprefix("--config="))
    return files


def plain_key(key: str) -> str:
    """``trainer.callbacks.init_args.alpha`` as ``trainer.callbacks.alpha``: how configs nest."""
    return ".".join(part for part in key.split(".") if part != "init_args")


def setting_keys(tree: object, prefix: str = "") -> set[str]:
    """Every dotted key in a loaded config file, list items and ``init_args`` levels left out."""
    keys: set[str] = set()
    if isinstance(tree, Mapping):
        for name, value in tree.items():
            key = prefix if name == "init_args" else f"{prefix}.{name}".lstrip(".")
            keys.add(key)
            keys |= setting_keys(value, key)
    elif isinstance(tree, list):
        for item in tree:
            keys |= setting_keys(item, prefix)
    return keys
