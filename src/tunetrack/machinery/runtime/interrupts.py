"""Being asked to stop: Ctrl-C (SIGINT), a scheduler's or `kill`'s SIGTERM (Kubernetes, SLURM,
systemd and `docker stop` send it, then SIGKILL after a grace period), or a closed terminal's
SIGHUP. Each is handled once, and only where stopping is safe.

Training stops at once. Optuna's and MLflow's bookkeeping (creating a trial, recording an
epoch's metrics, recording its end) is never cut in half: a request that arrives there is held
until that write is done, and then no new trial starts. Further requests are ignored, so the
clean-up that follows cannot be cut short either. The process then exits with 128 plus the
signal's number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process the signal
ended.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# What a trial that a request stopped is recorded as, by signal.
REASONS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"}


class _State:
    signum: int | None = None  # the first request's signal
    orphaned: int | None = None  # the pid of the tune.py whose end this worker stops for, unasked
    interruptible = False  # inside a block that may stop at once


def handler(signum, frame) -> None:
    """The handler of SIGINT, SIGTERM and SIGHUP in a tune.py or train.py process and in the
    workers: the first request stops, the others are ignored (Lightning puts this handler back
    when a fit ends, so a later one can still arrive here)."""
    for each in SIGNALS:
        signal.signal(each, signal.SIG_IGN)
    if _State.signum is not None:
        return
    _State.signum = signum
    if _State.interruptible:
        raise KeyboardInterrupt


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install :func:`handler` for the block, starting with no request, and restore the old
    handlers after it; after a request, the signals stay ignored instead, so that another one
    cannot cut into the libraries' clean-up as the process exits."""
    _State.signum, _State.interruptible, _State.orphaned = None, False, None
    hook, sys.unraisablehook = sys.unraisablehook, _unraisable  # a request a callback swallowed: see check()
    previous = {each: signal.signal(each, handler) for each in SIGNALS}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # what held_back() kept from a worker comes now
    try:
        yield
    finally:
        for each, old in previous.items():
            signal.signal(each, signal.SIG_IGN if _State.signum is not None else old)
        sys.unraisablehook = hook


@contextlib.contextmanager
def held_back() -> Iterator[None]:
    """Start processes in this block: a request that reaches one of them before it has installed
    its handlers waits until it has, instead of ending it unhandled. The mask is inherited, and
    :func:`handling` lifts it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A block that a request may stop at once, with KeyboardInterrupt."""
    if _State.signum is not None:
        raise KeyboardInterrupt
    _State.interruptible = True
    try:
        yield
    finally:
        _State.interruptible = False


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A block that a request never cuts in half, even inside an interruptible one: a write to
    a store, say, whose transaction an exception in the middle would leave holding its locks.
    A request that arrives here takes effect as the block ends."""
    was = _State.interruptible
    _State.interruptible = False
    try:
        yield
    finally:
        _State.interruptible = was
    if was and _State.signum is not None:
        raise KeyboardInterrupt


def requested() -> int | None:
    """The signal of the request to stop, if one came."""
    return _State.signum


def reason() -> str:
    """How a trial or a run that a request stopped is described: "interrupted", "terminated", or,
    for a worker whose tune.py ended without asking it to stop (killed outright), that."""
    if _State.orphaned is not None:
        return f"its tune.py (pid {_State.orphaned}) ended without a word: killed, or its machine stopped"
    return REASONS.get(_State.signum, "interrupted")


def exit_code() -> int:
    """What the process exits with after a request: 128 plus the signal's number."""
    return 128 + (_State.signum or signal.SIGINT)


def describe() -> str:
    """The request, as the last line says it: "interrupted (SIGINT)", "terminated (SIGTERM)"."""
    if _State.orphaned is not None:
        return reason()
    return f"{reason()} ({signal.Signals(_State.signum or signal.SIGINT).name})"


def check() -> None:
    """Stop now if a request came inside an interruptible block and did not stop it.

    The handler's KeyboardInterrupt is raised in whatever Python runs at that instant; when
    that is a garbage collector's weakref callback (SQLAlchemy's class registry has them), Python
    prints it as "Exception ignored" and goes on. Training calls this at every step, so the
    request takes effect one step later, and :func:`handling` keeps that print off the screen.
    """
    if _State.signum is not None and _State.interruptible:
        raise KeyboardInterrupt


def end_with(process: int, every: float = 0.5) -> None:
    """Stop this process (a SIGTERM to itself) once the process ``process`` is gone, however it
    ended (SIGKILL included): a worker never outlives its tune.py. The worker's parent is the
    fork server, which outlives tune.py while its forks run, so tune.py is watched by its pid:
    through a pidfd, which no later process can reuse, where the system has them."""

    def watch() -> None:
        try:
            handle = os.pidfd_open(process)
        except ProcessLookupError:
            handle = None  # gone already
        except (AttributeError, OSError):  # no pidfds here: ask every ``every`` s
            while alive(process):
                time.sleep(every)
            handle = None
        if handle is not None:
            select.select([handle], [], [])  # readable once the process has ended
        if _State.signum is None:  # tune.py did not pass a request on before it ended
            _State.orphaned = process
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="tune-watch", daemon=True).start()


def alive(pid: int) -> bool:
    """Whether a process ``pid`` of this pid namespace runs (a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    return True


def _unraisable(unraisable) -> None:
    if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _State.signum is not None):
        sys.__unraisablehook__(unraisable)
