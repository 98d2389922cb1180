"""Where tune.py's workers come from: forks of a server process that has imported what a worker
needs (torch, Lightning, MLflow, Optuna, the experiment) once, started as soon as tune.py's
flags parse, so that those seconds of imports overlap tune.py's own instead of following them
in every worker. The server does no computation before it forks, so no thread pool of
torch's is running to be forked.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Sequence
from multiprocessing import forkserver

from tunetrack.machinery.runtime import collector, interrupts

CONTEXT = mp.get_context("forkserver")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def start(modules: Sequence[str] = ()) -> None:
    """Start the server (once per process), with ``modules`` imported in it beside the worker's
    own. It starts with the stop signals blocked: its forks, the workers, keep them blocked
    until their handlers are in place (interrupts.handling), and neither it nor the process
    that multiprocessing starts beside it to release the workers' semaphores (its resource
    tracker, started here too) ends on a closed terminal's SIGHUP; the server ends when
    tune.py does."""
    # A tune.py killed outright (SIGKILL) cannot release the semaphores its workers share; the
    # process that multiprocessing starts to watch them (here, with this environment) releases
    # them, and would also print a warning that nobody can act on.
    quiet = "ignore:resource_tracker:UserWarning"
    if quiet not in os.environ.get("PYTHONWARNINGS", ""):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), quiet]))
    # The collector, imported first, pauses in the server while it imports (runtime.collector).
    CONTEXT.set_forkserver_preload([collector.__name__, "tunetrack.machinery.study.workers", *modules])
    os.environ[collector.PAUSE_VARIABLE] = "1"
    try:
        with interrupts.held_back():
            forkserver.ensure_running()
    finally:
        del os.environ[collector.PAUSE_VARIABLE]
