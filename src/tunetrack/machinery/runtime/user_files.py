"""The Python files of --import: a user's own data sets and networks, registered in the
experiment's registries as each file is imported, in the scripts and in every worker."""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def import_files(parser: argparse.ArgumentParser | None, paths: tuple[str, ...]) -> None:
    """Import each Python file of --import (once per process): what it registers is there to use."""
    for path in paths:
        name = f"imported_{Path(path).stem}"
        if name in sys.modules:
            continue
        if not Path(path).is_file():
            _error(parser, f"argument --import: {path!r} is not a file")
        spec = importlib.util.spec_from_loader(name, importlib.machinery.SourceFileLoader(name, path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - whatever the user's file raises, in one line
            del sys.modules[name]
            _error(parser, f"argument --import: {path}: {type(error).__name__}: {error}")


def _error(parser: argparse.ArgumentParser | None, message: str):
    if parser is None:
        raise RuntimeError(message)
    parser.error(message)
