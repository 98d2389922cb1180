"""optuna-dashboard beside a live study: it reads the SQLite storage while two workers write
to it, and the study ends well (a dashboard polling a live SQLite study has been seen to fail
it with "database is locked", optuna-dashboard issue 545)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest import ROOT, read_trials, tune_args, wait_for
from workbench.servers import free_port

DASHBOARD = Path(sys.executable).parent / "optuna-dashboard"


def api(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.load(response)


@pytest.mark.slow
@pytest.mark.skipif(not DASHBOARD.exists(), reason="optuna-dashboard is not installed: pip install -e '.[dashboard]'")
def test_the_dashboard_follows_a_live_study_and_the_study_ends_well(run_script, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = tune_args(tiny_data, "--n-trials", "6", "--workers", "2", "--max-epochs", "15")
    # Its first trial waits at its second epoch until the dashboard has shown it running.
    held, release = tmp_path / "held", tmp_path / "release"
    env = {"TINY_HOLD_AT_EPOCH": "1", "TINY_HOLD_FILE": str(held), "TINY_RELEASE_FILE": str(release)}
    study = run_script("tune.py", *args, background=True, env=env)
    wait_for(held.exists, what="a trial in flight", process=study)
    port = free_port()
    dashboard = subprocess.Popen(
        [str(DASHBOARD), storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        [summary] = wait_for(lambda: _studies(port), what="the dashboard's answer")
        trials_url = f"/api/studies/{summary['study_id']}?after=0"
        running = wait_for(lambda: [t for t in api(port, trials_url)["trials"] if t["state"].upper() == "RUNNING"],
                           what="a running trial on the dashboard", process=study)  # fmt: skip
        release.touch()
        while study.poll() is None:  # as its page does while it is open, only faster
            api(port, trials_url)
            time.sleep(0.2)
        stdout, stderr = study.communicate()
        assert study.returncode == 0 and "database is locked" not in stdout + stderr, stderr
        seen = api(port, trials_url)["trials"]
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
    trials = read_trials(storage)
    assert running and len(trials) == 6
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert sorted((t["number"], t["state"].upper()) for t in seen) == [(t.number, t.state.name) for t in trials]


def _studies(port: int) -> list[dict]:
    try:
        return api(port, "/api/studies")["study_summaries"]
    except OSError:
        return []


@pytest.mark.parametrize("before", ["no file", "an empty file"])
def test_make_dashboard_before_the_first_study_is_one_line_and_creates_nothing(tmp_path, before, capsys, monkeypatch):
    """make dashboard runs scripts/dashboard.py: optuna-dashboard itself made an empty optuna.db
    and failed on it with an 88-line traceback."""
    spec = importlib.util.spec_from_file_location("dashboard_script", ROOT / "scripts" / "dashboard.py")
    dashboard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dashboard)
    if before == "an empty file":
        (tmp_path / "optuna.db").touch()
    monkeypatch.setattr(sys, "argv", ["dashboard.py"])  # argparse names the script after it
    with pytest.raises(SystemExit) as exit_:
        dashboard.main([])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and line.startswith("dashboard.py: error: argument --storage: ")
    assert line.endswith(": make taste or make tune first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if before == "no file" else ["optuna.db"])
    assert not (tmp_path / "optuna.db").exists() or (tmp_path / "optuna.db").stat().st_size == 0


@pytest.mark.slow
@pytest.mark.skipif(not DASHBOARD.exists(), reason="optuna-dashboard is not installed: pip install -e '.[dashboard]'")
def test_the_dashboard_shows_a_study_of_two_objectives_and_its_pareto_front(study_env):
    session = study_env("two", n_trials=4, options={"objective": "val_acc,params"}, max_epochs=1)
    port = free_port()
    dashboard = subprocess.Popen([str(DASHBOARD), study_env.storage, "--host", "127.0.0.1", "--port", str(port),
                                  "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        [summary] = wait_for(lambda: _studies(port), what="the dashboard's answer")
        shown = api(port, f"/api/studies/{summary['study_id']}?after=0")
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
    assert shown["directions"] == ["maximize", "minimize"] and shown["objective_names"] == ["val_acc", "params"]
    assert sorted(t["number"] for t in shown["best_trials"]) == sorted(t.number for t in session.study.best_trials)
