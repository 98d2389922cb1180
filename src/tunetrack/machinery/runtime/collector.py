"""Python's garbage collector in a script that imports torch, Lightning, MLflow and Optuna.

They leave hundreds of thousands of objects that live as long as the process. While they are
imported the collector runs again and again and finds nothing; afterwards every full collection
walks them all, and so does the interpreter's last one, at exit. So a script's own process
pauses the collector while it imports, then freezes (gc.freeze) what is there: out of every
collection's way, while objects made later are collected as ever (docs/performance.md shows the
difference, with the command that measures it). The workers' fork server imports this module
first, with PAUSE_VARIABLE set, and so imports paused too; each worker, a fork of it, freezes
what it inherited.

A process that did not pause (a test session or a notebook that calls a script's main) is left
as it is: frozen objects that later become garbage are never freed, which only a process that
ends with its script can afford. The price at exit: an object caught in a reference cycle is not
finalized, so nothing here leaves its data to a finalizer (stores commit explicitly, files are
closed by ``with``); handlers registered with atexit still run.
"""

from __future__ import annotations

import atexit
import gc
import os

# Set in the environment a fork server starts with (study.fork_server), and taken out of it
# here, so that the server pauses as it imports and nothing it starts inherits the request.
PAUSE_VARIABLE = "TUNETRACK_PAUSE_COLLECTOR"

_paused = False  # forks inherit it: the workers of a paused fork server freeze too


def pause() -> None:
    """No collections until freeze_imports(): call it first thing in a script's own process."""
    global _paused
    _paused = True
    gc.disable()
    atexit.register(gc.freeze)  # at exit, whatever was made since: the last collection has nothing to walk


def freeze_imports() -> None:
    """In a process that paused the collector: freeze every object there and turn the
    collector on again. Call it once the imports are done; elsewhere it does nothing."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()


if os.environ.pop(PAUSE_VARIABLE, None):
    pause()
