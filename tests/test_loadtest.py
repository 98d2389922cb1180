"""The load test of the stores (scripts/loadtest.py), small: 1 and 2 workers for a few seconds
each, against the PostgreSQL and mlflow server it starts. Its checks hold (every trial COMPLETE,
every run FINISHED with all its epochs, no store error reaching a worker) and its table has its
columns and a row per worker count."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from workbench.loadtest import COLUMNS
from workbench.servers import postgres_bin

pytestmark = [
    pytest.mark.servers,
    pytest.mark.slow,
    pytest.mark.skipif(
        postgres_bin() is None, reason="PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it"
    ),
]


def test_the_load_test_checks_every_trial_and_prints_its_table():
    command = [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--workers", "1", "2", "--seconds", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    said = result.stdout + result.stderr
    assert result.returncode == 0, said

    lines = result.stdout.splitlines()
    checks = [line for line in lines if line.startswith(("ok ", "FAILED "))]
    for workers in (1, 2):
        mine = [line for line in checks if f" {workers} workers: " in line]
        assert [line.split(": ")[1] for line in mine] == [
            "every trial COMPLETE",
            "every MLflow run FINISHED with its 3 epochs of train_loss, val_loss, val_acc",
            "no store error reached a worker as a failure",
            "every worker's calls timed",
        ], said
        assert all(line.startswith("ok ") for line in mine), said

    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    assert rows[0] == list(COLUMNS)
    assert [row[0] for row in rows[2:]] == ["1", "2"]
    for row in rows[2:]:
        assert int(row[1]) >= int(row[0]) and float(row[3]) > 0  # every worker ran a trial
        assert all(" / " in cell for cell in row[4:6])  # the waits' median and 95th percentile
    assert any(line.startswith("ceiling: ") for line in lines)
