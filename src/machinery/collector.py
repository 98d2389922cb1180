"""Python's garbage collector in a process that imports torch, Lightning, MLflow and Optuna:
over half a million objects that live as long as the process. While they are imported, the
collector runs again and again and finds nothing (about 2 s of a script's start); afterwards
every full collection walks them all, and so does the interpreter's last one, at exit, for 2 to
3 s after the last line is printed. So a script pauses the collector while it imports, and
freezes (gc.freeze) what its imports made: out of every collection's way, while objects made
later are collected as ever. The workers' fork server imports with the collector paused too
(machinery.collector_paused); each worker freezes what it inherited."""

from __future__ import annotations

import atexit
import gc

_exit_registered = False


def pause() -> None:
    """No collections until freeze_imports(): call it first thing in a script's own process."""
    gc.disable()
    _spare_exit()


def freeze_imports() -> None:
    """Collect what is garbage now, freeze every object left and turn the collector on: call it
    once the imports are done."""
    if gc.isenabled():  # not paused: a process that lives on (a test session, a notebook)
        gc.collect()  # freezes no garbage
    gc.freeze()
    gc.enable()
    _spare_exit()


def _spare_exit() -> None:
    """Freeze whatever was made since, at exit: the interpreter's last collection (made even
    with the collector paused) then has nothing to walk."""
    global _exit_registered
    if not _exit_registered:
        _exit_registered = True
        atexit.register(gc.freeze)
