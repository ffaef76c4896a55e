"""The architecture as a check: layers only import downwards, and what a method is lives on the method.

The layer order is declared once, in ``pyproject.toml`` (``[tool.importlinter]``), and explained in the
README's "Development" section.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cass.methods.registry import method_names

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run import-linter with the project's contract on the package under ``root/src``."""
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_layers_only_point_down():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("low, high", [("cass/utils/atomic.py", "cass.cli.main"),
                                       ("cass/data/images.py", "cass.training.pretrain"),
                                       ("cass/methods/base.py", "cass.experiment.run")])
def test_a_climbing_import_fails_the_check(tmp_path, low, high):
    shutil.copytree(REPO / "src" / "cass", tmp_path / "src" / "cass",
                    ignore=shutil.ignore_patterns("__pycache__", "sample"))
    module = tmp_path / "src" / low
    module.write_text(module.read_text() + f"\n\ndef _climb():\n    import {high}  # noqa: F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and high in result.stdout, result.stdout


def test_no_method_name_is_compared_outside_the_methods_package():
    """Adding a method touches ``methods/`` and its config section only: nothing else branches on a name."""
    names = "|".join(re.escape(name) for name in method_names())
    comparison = re.compile(rf"""(==|!=|\bin\b)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    offenders = []
    for path in (REPO / "src" / "cass").rglob("*.py"):
        if "methods" in path.relative_to(REPO / "src" / "cass").parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if comparison.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
