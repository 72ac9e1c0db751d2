"""The floors of the package: the import contract holds, would catch an upward import, no cycles."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from adaptalign.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package found first on the path from ``cwd``."""
    return subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"],
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_import_contract_is_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("datamodules/records.py", "adaptalign.lightning_modules.losses"),  # data -> system
        ("lightning_modules/losses.py", "adaptalign.datamodules.records"),  # system -> data
        ("callbacks/log_steps.py", "adaptalign.experiments.compare"),  # callbacks -> experiments
        ("common/errors.py", "adaptalign.encoders.text_models"),  # helpers -> encoders
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path: Path, module: str, upward: str) -> None:
    shutil.copytree(ROOT / "adaptalign", tmp_path / "adaptalign")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "adaptalign" / module
    target.write_text(target.read_text() + f"\nimport {upward}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and upward in result.stdout


def test_no_module_imports_itself_through_others() -> None:
    """No cycles at run time (imports only for type checkers do not run)."""
    graph = grimp.build_graph("adaptalign", exclude_type_checking_imports=True)
    cycles = [
        (importer, imported)
        for importer in sorted(graph.modules)
        for imported in graph.find_modules_directly_imported_by(importer)
        if imported != importer and graph.chain_exists(imported, importer)
    ]
    assert cycles == []


def test_help_lists_every_subcommand_without_loading_torch() -> None:
    code = (
        "import sys\n"
        "from adaptalign.cli import main\n"
        "assert main(['--help']) == 0\n"
        "heavy = {'torch', 'lightning', 'timm', 'sentence_transformers'}\n"
        "heavy = sorted(heavy & set(sys.modules))\n"
        "print('heavy:', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    listed = [line.split()[0] for line in result.stdout.split("subcommands:")[1].splitlines()[1:11]]
    assert listed == list(SUBCOMMANDS)
    assert set(SUBCOMMANDS) == {
        "fit", "validate", "test", "predict", "compare", "tune", "stress", "tsne", "shards",
        "report",
    }  # fmt: skip
    assert "heavy: []" in result.stdout


def test_every_subcommand_module_has_a_main() -> None:
    for name, command in SUBCOMMANDS.items():
        assert callable(command.entry()), name


def test_unknown_subcommand_is_one_line_with_a_suggestion(capsys: pytest.CaptureFixture) -> None:
    from adaptalign.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["compar"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "adaptalign: error: unknown subcommand 'compar' (did you mean 'compare'?); expected one "
        "of fit, validate, test, predict, compare, tune, stress, tsne, shards, report"
    ]


@pytest.mark.slow
def test_the_console_command_hands_lightning_its_own_command_line() -> None:
    """Lightning reads ``sys.argv`` itself when run from the console; given the same arguments
    again it warns that both were given."""
    command = ["fit", "--config", "tests/configs/tiny.yaml", "--print_config"]
    result = subprocess.run(
        [sys.executable, "-m", "adaptalign", *command],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert "test_resnet" in result.stdout
    assert "args parameter" not in result.stderr, result.stderr


@pytest.mark.parametrize("name", ["compare", "stress", "tsne", "report"])
def test_a_bad_option_of_any_subcommand_is_one_line(
    name: str, capsys: pytest.CaptureFixture
) -> None:
    from adaptalign.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([name, "--no-such-option"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"adaptalign: error: {name}: "), err
