"""machinery.collector: a script pauses the garbage collector while it imports and freezes what
the imports made; a process that lives on (this test session) has its garbage collected first,
and the collector is on again afterwards in both."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

from machinery import collector


def test_a_script_freezes_its_imports_and_collects_again_afterwards():
    script = (
        "import gc; from machinery import collector; collector.pause(); paused = not gc.isenabled(); "
        "import experiment.search, machinery.workers; collector.freeze_imports(); "
        "print(paused, gc.isenabled(), gc.get_freeze_count())"
    )
    said = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    paused, enabled, frozen = said
    assert (paused, enabled) == ("True", "True")
    assert int(frozen) > 100_000  # torch, Lightning, MLflow and Optuna's objects, out of every collection


def test_a_process_that_lives_on_freezes_no_garbage():
    class Node:
        pass

    thresholds = gc.get_threshold()
    gc.set_threshold(10**9)  # no collection of its own comes between
    try:
        node = Node()
        node.itself = node  # a cycle: only the collector frees it
        alive = weakref.ref(node)
        del node
        collector.freeze_imports()
        assert alive() is None and gc.isenabled()
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()  # this session's objects, back in the collector's care
