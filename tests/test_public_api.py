"""The public API: names importable from the package, and every class path the docs give."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

import adaptalign

ROOT = Path(__file__).parents[1]
CLASS_PATH = re.compile(r"\badaptalign(?:\.[a-z_]+)+\.[A-Z]\w+")


def resolve(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_the_main_names_import_from_the_package() -> None:
    from adaptalign import AlignmentDataModule, AlignmentModule, Controls

    assert AlignmentModule.__module__ == "adaptalign.lightning_modules.system"
    assert AlignmentDataModule.__module__ == "adaptalign.datamodules.datamodule"
    assert Controls.__module__ == "adaptalign.lightning_modules.controls"


@pytest.mark.parametrize("name", adaptalign.__all__)
def test_every_public_name_resolves_to_its_own_definition(name: str) -> None:
    value = getattr(adaptalign, name)
    assert value.__name__ == name
    assert name in dir(adaptalign)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'AlignmentModel'"):
        _ = adaptalign.AlignmentModel


def documented_class_paths() -> list[str]:
    texts = [(ROOT / "README.md").read_text(), (ROOT / "docs" / "RESULTS.md").read_text()]
    found = {m.group(0) for text in texts for m in CLASS_PATH.finditer(text)}
    for path in (ROOT / "configs").rglob("*.yaml"):
        found |= {m.group(0) for m in CLASS_PATH.finditer(path.read_text())}
    return sorted(found)


def test_the_docs_and_configs_name_classes() -> None:
    paths = documented_class_paths()
    assert "adaptalign.datamodules.AlignmentDataModule" in paths
    assert "adaptalign.lightning_modules.AlignmentModule" in paths
    assert len(paths) >= 10


@pytest.mark.parametrize("path", documented_class_paths())
def test_every_documented_class_path_imports(path: str) -> None:
    assert isinstance(resolve(path), type), path


def test_the_readme_import_lines_run() -> None:
    lines = re.findall(
        r"^from adaptalign[\w.]* import [\w, ]+$", (ROOT / "README.md").read_text(), re.M
    )
    assert lines, "the README shows how to import the package"
    for line in lines:
        exec(line, {})


def test_shipped_configs_name_only_importable_classes() -> None:
    for path in (ROOT / "configs").rglob("*.yaml"):
        text = path.read_text()
        for value in re.findall(r"class_path:\s*(\S+)", text):
            assert isinstance(resolve(value), type), (path, value)
        assert yaml.safe_load(text) is not None or path.stat().st_size == 0
