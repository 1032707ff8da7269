"""The layers hold: web/ and worker/ depend on common/, never on each other, and
common/ depends on neither (nor on Flask). The contracts are in pyproject.toml
([tool.importlinter]); `lint-imports` checks the same from the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_import_contracts_are_kept() -> None:
    # In its own process: import-linter's lint_imports() calls logging's dictConfig, which
    # disables every logger that exists, and a later test would capture no log.
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [lint, "--config", "pyproject.toml", "--no-cache"],
        cwd=ROOT,  # import-linter reads the packages from the current directory
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout
