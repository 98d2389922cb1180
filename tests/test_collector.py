"""machinery.runtime.collector: a script pauses the garbage collector while it imports and freezes what
the imports made, and the collector is on again afterwards; a process that did not pause (this
test session, a notebook) is left as it is."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from conftest import env_with_tiny
from tunetrack.machinery.runtime import collector


def environment() -> dict:
    return {**os.environ, **env_with_tiny()}


@pytest.mark.slow
def test_a_script_freezes_its_imports_and_collects_again_afterwards():
    script = (
        "import gc; from tunetrack.machinery.runtime import collector; collector.pause(); paused = not gc.isenabled(); "
        "import tiny.experiment, tunetrack.machinery.study.workers; collector.freeze_imports(); "
        "print(paused, gc.isenabled(), gc.get_freeze_count())"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=environment())
    said = run.stdout.split()
    paused, enabled, frozen = said
    assert (paused, enabled) == ("True", "True")
    assert int(frozen) > 100_000  # torch, Lightning, MLflow and Optuna's objects, out of every collection


def test_a_process_that_did_not_pause_is_left_as_it_is():
    frozen = gc.get_freeze_count()
    collector.freeze_imports()  # as tune.py's main, called in this process, and its single worker do
    assert gc.get_freeze_count() == frozen and gc.isenabled()


PROBE = '''
import gc

from tunetrack.machinery.runtime import collector


def report(answers):
    """In a worker: the collector as the fork server left it, then as a worker turns it on."""
    inherited = gc.isenabled()
    collector.freeze_imports()  # what each of tune.py's workers does first
    answers.put((inherited, gc.isenabled(), gc.get_freeze_count()))
'''


@pytest.mark.slow
def test_the_fork_server_imports_paused_and_each_worker_freezes_what_it_inherited(tmp_path):
    """tune.py's process goes on collecting; the server its workers are forked from imports
    with the collector paused, and a worker freezes those imports and collects again."""
    (tmp_path / "probe.py").write_text(PROBE)
    script = (
        "import gc, os; from tunetrack.machinery.runtime import collector; "
        "from tunetrack.machinery.study import fork_server; import probe; "
        "fork_server.start(['probe']); answers = fork_server.CONTEXT.SimpleQueue(); "
        "worker = fork_server.CONTEXT.Process(target=probe.report, args=(answers,)); worker.start(); "
        "print(*answers.get(), gc.isenabled(), collector.PAUSE_VARIABLE in os.environ); worker.join()"
    )
    env = {**environment(), "PYTHONPATH": os.pathsep.join([str(tmp_path), environment()["PYTHONPATH"]])}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    inherited, enabled, frozen, parent_enabled, variable_left = run.stdout.split()
    assert (inherited, enabled) == ("False", "True")  # paused in the server; on again in the worker
    assert int(frozen) > 100_000  # what the server imported (torch, Lightning, MLflow, Optuna), frozen
    assert (parent_enabled, variable_left) == ("True", "False")  # tune.py itself, and what it passes on
