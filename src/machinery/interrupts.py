"""Ctrl-C during a study: handled once, and only where stopping is safe.

Training stops at once. Optuna's and MLflow's bookkeeping (creating a trial, recording an
epoch's metrics, recording its end) is never cut in half: a Ctrl-C that arrives there is held
until that write is done, and then no new trial starts. A second Ctrl-C is ignored, so the clean-up that
follows cannot be cut short either.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator


class _State:
    requested = False  # Ctrl-C has been pressed
    interruptible = False  # inside a block that may stop at once


def handler(signum, frame) -> None:
    """The SIGINT handler of a tune.py process and of its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _State.requested = True
    if _State.interruptible:
        raise KeyboardInterrupt


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install :func:`handler` for the block, starting with no request, and restore the old one
    after it; after a Ctrl-C, SIGINT stays ignored instead, so that a second one cannot cut
    into the libraries' clean-up as the process exits."""
    _State.requested = _State.interruptible = False
    sys.unraisablehook = _unraisable  # a Ctrl-C swallowed by a callback: check() acts on it
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN if _State.requested else previous)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A block that Ctrl-C may stop at once, with KeyboardInterrupt."""
    if _State.requested:
        raise KeyboardInterrupt
    _State.interruptible = True
    try:
        yield
    finally:
        _State.interruptible = False


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A block that Ctrl-C never cuts in half, even inside an interruptible one: a write to a
    store, say, whose transaction an exception in the middle would leave holding its locks.
    A Ctrl-C that arrives here takes effect as the block ends."""
    was = _State.interruptible
    _State.interruptible = False
    try:
        yield
    finally:
        _State.interruptible = was
    if was and _State.requested:
        raise KeyboardInterrupt


def requested() -> bool:
    return _State.requested


def check() -> None:
    """Stop now if Ctrl-C was pressed inside an interruptible block and did not stop it.

    The handler's KeyboardInterrupt is raised in whatever Python runs at that instant; when
    that is a garbage collector's weakref callback (seen: SQLAlchemy's class registry), Python
    prints it as "Exception ignored" and goes on. Training calls this at every step, so the
    Ctrl-C takes effect one step later, and :func:`handling` keeps that print off the screen.
    """
    if _State.requested and _State.interruptible:
        raise KeyboardInterrupt


def _unraisable(unraisable, hook=sys.unraisablehook) -> None:
    if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _State.requested):
        hook(unraisable)
