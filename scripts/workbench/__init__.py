"""The repository's own tools for measuring and picturing it, beside the scripts that run them
and outside the installed package: not needed to train, tune or use a model. Benchmarks, load
tests and comparisons, throwaway PostgreSQL and mlflow servers, `mlflow ui` in a real browser,
the README's figures and tables."""

from __future__ import annotations

import os
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1]  # the folder that holds this package
TESTS = SCRIPTS.parent / "tests"  # the tests' tiny experiment, which the load test trains


def python_path(*folders: Path) -> str:
    """PYTHONPATH for a process of its own that imports from ``folders`` (and from this package)
    as well as from what this process's environment names."""
    return os.pathsep.join(map(str, [*folders, SCRIPTS, *filter(None, [os.environ.get("PYTHONPATH")])]))
