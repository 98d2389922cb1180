"""machinery.collector: a script pauses the garbage collector while it imports and freezes what
the imports made, and the collector is on again afterwards; a process that did not pause (this
test session, a notebook) is left as it is."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from conftest import env_with_tiny
from machinery import collector


def environment() -> dict:
    return {**os.environ, **env_with_tiny()}


@pytest.mark.slow
def test_a_script_freezes_its_imports_and_collects_again_afterwards():
    script = (
        "import gc; from machinery import collector; collector.pause(); paused = not gc.isenabled(); "
        "import tiny.experiment, machinery.workers; collector.freeze_imports(); "
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
