"""The layers hold: web/ and worker/ depend on common/, never on each other, and
common/ depends on neither (nor on Flask). The contracts are in pyproject.toml
([tool.importlinter]); `lint-imports` checks the same from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[2]


def test_the_import_contracts_are_kept(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # import-linter reads the packages from the current directory.
    monkeypatch.chdir(ROOT)
    exit_code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    report = capsys.readouterr().out
    assert exit_code == 0, report
    assert "2 kept, 0 broken" in report
