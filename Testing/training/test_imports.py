"""The training package's modules import in one direction: paths <- procedures <- config <- trainer (no
circle), so each can be read, and imported, without the ones above it."""

from __future__ import annotations

import ast
import subprocess
import sys

from Testing.conftest import REPO_ROOT

TRAINING = REPO_ROOT / "training"


def _imported_modules(path) -> set[str]:
    """Every ``training.*`` module a file imports, at any level (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = node.module if node.level == 0 else f"training.{node.module}" if node.level == 1 else node.module
            found.add(module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("training")}


def test_procedures_import_neither_config_nor_trainer():
    imported = _imported_modules(TRAINING / "procedures" / "__init__.py")
    assert "training.config" not in imported and "training.trainer" not in imported, imported
    for path in (TRAINING / "procedures").glob("*.py"):
        if path.name == "grid004.py":   # its sweep driver (run_grid, expand_grid) sits above config and trainer
            continue
        imported = _imported_modules(path)
        assert "training.config" not in imported and "training.trainer" not in imported, (path.name, imported)


def test_config_does_not_import_the_trainer_and_paths_is_a_leaf():
    assert "training.trainer" not in _imported_modules(TRAINING / "config.py")
    assert _imported_modules(TRAINING / "paths.py") == set()


def test_importing_a_lower_module_loads_nothing_above_it():
    code = ("import sys, training.procedures, training.paths; "
            "print(sorted(m for m in sys.modules if m in ('training.config', 'training.trainer')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]", run.stdout
