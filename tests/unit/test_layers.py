"""One-way layers: the CLI above the service (app) and the worker, the worker above the service, the engine beneath
neither. An arrow that runs back up is a design bug, however convenient."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(folder: str) -> dict[str, set[str]]:
    """Every module each file under `folder` imports, at any depth (lazy imports inside functions too)."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def offending(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """The files under `folder` that import a module under one of `forbidden` (and not under `allowed`)."""
    found = {}
    for path, names in imported_modules(folder).items():
        bad = sorted(n for n in names if f"{n}.".startswith(forbidden) and not f"{n}.".startswith(allowed))
        if bad:
            found[path] = bad
    return found


def test_no_app_module_loads_a_worker_module():
    script = (
        "import importlib, pkgutil, sys\n"
        "import app\n"
        "names = [m.name for m in pkgutil.walk_packages(app.__path__, 'app.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names), sorted(m for m in sys.modules if m == 'worker' or m.startswith('worker.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    count, loaded = result.stdout.strip().split(" ", 1)
    assert int(count) > 50  # every module of the service was imported
    assert loaded == "[]"


def test_no_app_source_imports_the_worker():
    assert offending("app", ("worker.",)) == {}


def test_the_engine_imports_neither_the_service_nor_the_rest_of_the_worker():
    assert offending("worker/engine", ("app.", "worker."), allowed=("worker.engine.",)) == {}


def test_app_core_imports_no_domain():
    domains = tuple(
        f"app.{p.name}." for p in (ROOT / "app").iterdir() if p.is_dir() and p.name not in ("core", "__pycache__")
    )
    assert offending("app/core", domains) == {}
