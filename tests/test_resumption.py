"""A trial cut short goes on where it stopped: killed outright (its worker's SIGKILL) or asked to
stop by a scheduler (SIGTERM to tune.py) in its fourth epoch of six, it is taken up by the next
run at its fourth epoch and ends with the very val_loss of the same trial never interrupted, its
MLflow run holding every epoch once, the study listing it once. The moment is an event (the
tiny experiment's HoldAtEpoch), not a time."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import read_trials, tune_args, wait_for
from tunetrack.machinery.study import studies
from tunetrack.machinery.study.storage import open_storage

EPOCHS, HELD_AT = 6, 3  # the fourth epoch of six, 0-based
COMMON = ("--max-epochs", str(EPOCHS), "--no-pruning", "--model", "conv")


def uninterrupted(call_script, tiny_data, folder: Path, workers: int) -> dict[int, float]:
    """Each trial's val_loss in a study that nothing stops."""
    folder.mkdir()
    done = call_script("tune.py", *tune_args(tiny_data, "--n-trials", str(workers), "--workers", str(workers), *COMMON),
                       cwd=folder)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {t.number: t.value for t in read_trials(f"sqlite:///{folder / 'optuna.db'}")}


def held(run_script, tiny_data, tmp_path, workers: int):
    """A tune.py whose first trial to reach the fourth epoch waits there; and that trial's worker."""
    hold = tmp_path / "held"
    env = {"TINY_HOLD_AT_EPOCH": str(HELD_AT), "TINY_HOLD_FILE": str(hold)}
    args = tune_args(tiny_data, "--n-trials", str(workers), "--workers", str(workers), *COMMON)
    process = run_script("tune.py", *args, background=True, env=env)
    wait_for(lambda: hold.exists() and hold.read_text(), what="a trial at its fourth epoch", process=process)
    return process, int(hold.read_text())


def assert_resumed_whole(tmp_path, expected: dict[int, float], stdout: str) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    trials = read_trials(storage)
    [resumed] = [t for t in trials if studies.CUT_SHORT_ATTR in t.user_attrs]
    assert f"trial {resumed.number:>3} COMPLETE" in stdout
    assert resumed.user_attrs[studies.CUT_SHORT_ATTR]["epoch"] == HELD_AT  # taken up at the fourth epoch
    assert {t.number: t.value for t in trials} == expected  # exactly: the same arithmetic, in the same order
    assert [t.state for t in trials] == [TrialState.COMPLETE] * len(expected)  # each trial listed once
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(resumed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["resumed"].startswith(f"from epoch {HELD_AT + 1} after")
    for metric in ("train_loss", "val_loss", "val_acc"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == list(range(EPOCHS))
    runs = [r for r in client.search_runs(["1"]) if "optuna.trial" in r.data.tags]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == sorted(expected)  # one run per trial
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "kept" not in artifacts and "checkpoints" in artifacts  # a trial that ended keeps no state to go on from


@pytest.mark.slow
def test_a_trial_whose_tune_py_a_scheduler_stops_goes_on_in_the_next_run(run_script, call_script, tiny_data, tmp_path):
    expected = uninterrupted(call_script, tiny_data, tmp_path / "uninterrupted", workers=1)
    process, _ = held(run_script, tiny_data, tmp_path, workers=1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert f"cut short (terminated): it resumes from epoch {HELD_AT + 1}" in stdout  # counted from 1
    assert "1 cut short, to resume" in stdout
    [waiting] = read_trials(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert waiting.state == TrialState.WAITING and waiting.user_attrs[studies.KEPT_ATTR]["epoch"] == HELD_AT - 1

    again = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--workers", "1", *COMMON), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_resumed_whole(tmp_path, expected, again.stdout)


@pytest.mark.slow
def test_a_trial_whose_worker_is_killed_outright_goes_on_in_the_next_run(run_script, call_script, tiny_data, tmp_path):
    expected = uninterrupted(call_script, tiny_data, tmp_path / "uninterrupted", workers=2)
    process, worker = held(run_script, tiny_data, tmp_path, workers=2)
    os.kill(worker, signal.SIGKILL)  # no handler, no clean-up: what a machine that vanished leaves
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1 and "exited with code -9" in stderr, stderr
    assert "was left running by a process that is gone: cut short (its worker process died): it resumes" in stdout

    # One worker now; the trial trains with the threads it started with, so its sums come out the same.
    again = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--workers", "1", *COMMON), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_resumed_whole(tmp_path, expected, again.stdout)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # a study stepped by hand
def test_a_trial_cut_short_more_often_than_allowed_fails_and_says_why(tmp_path):
    path = tmp_path / "optuna.db"
    storage = open_storage(f"sqlite:///{path}", grace=60)
    study = optuna.create_study(study_name="s", storage=storage)
    gone = {"host": "another machine", "pid": 1, "pids": None}  # only its heartbeat can tell it died
    for times in (0, 1, 2):
        trial = study.ask()
        trial.set_user_attr(studies.WORKER_ATTR, gone)
        if times:
            trial.set_user_attr(studies.CUT_SHORT_ATTR, {"times": times, "why": "terminated", "epoch": 2})
        storage.record_heartbeat(trial._trial_id)
    assert not studies.take_back_dead_trials(storage, "s", 60, attempts=2, silent=True)  # their heartbeats are fresh

    def silent_since_long_ago(table: str, column: str) -> None:
        with sqlite3.connect(path) as db:
            db.execute(f"UPDATE {table} SET {column} = '2000-01-01 00:00:00.000000'")

    silent_since_long_ago("trials", "datetime_start")
    silent_since_long_ago("trial_heartbeats", "heartbeat")
    taken = studies.take_back_dead_trials(storage, "s", 60, attempts=2, silent=True)
    assert [t.state for t in taken] == [TrialState.WAITING, TrialState.WAITING, TrialState.FAIL]
    assert [t.user_attrs[studies.CUT_SHORT_ATTR]["times"] for t in taken[:2]] == [1, 2]
    assert taken[2].user_attrs["fail_reason"] == (
        "its heartbeat stopped for over 60 s; cut short 3 times, more than --resume-attempts 2"
    )
    assert not studies.take_back_dead_trials(storage, "s", 60, attempts=2, silent=True)  # once

    # Taken up again, a trial is RUNNING anew with its last worker's old heartbeat: Optuna alone
    # would call it stale at once; here it is not.
    again = study.ask()
    assert again.number == 0
    assert optuna.storages.RDBStorage._get_stale_trial_ids(storage, study._study_id) == [again._trial_id]
    assert storage._get_stale_trial_ids(study._study_id) == []


def cut_short_by_a_scheduler(run_script, tiny_data, tmp_path) -> tuple[str, str]:
    """A study whose one trial a SIGTERM cut short at its fourth epoch: that trial's run, and the
    folder of the state it kept there."""
    process, _ = held(run_script, tiny_data, tmp_path, workers=1)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    [waiting] = read_trials(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert waiting.state == TrialState.WAITING and waiting.user_attrs[studies.KEPT_ATTR]
    run_id = waiting.user_attrs["mlflow_run_id"]
    [kept] = list(tmp_path.glob(f"mlruns/*/{run_id}/artifacts/kept"))
    return run_id, kept


def assert_started_again(tmp_path, expected: dict[int, float], stdout: str, old_run: str, why: str) -> None:
    [trial] = read_trials(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert trial.state == TrialState.COMPLETE and trial.value == expected[0]  # trained whole, as if never cut
    assert "trial   0 COMPLETE" in stdout and f"started again from epoch 1: {why}" in stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    new = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert new.info.run_id != old_run and new.info.status == "FINISHED"
    assert new.data.tags["continues"] == old_run and new.data.tags["restarted"].startswith(why)
    assert [m.step for m in client.get_metric_history(new.info.run_id, "val_loss")] == list(range(EPOCHS))
    assert client.get_run(old_run).info.status == "KILLED"
    assert "kept" not in [a.path for a in client.list_artifacts(new.info.run_id)]


@pytest.mark.slow
def test_a_trial_whose_kept_state_is_gone_starts_again_and_the_study_goes_on(
    run_script, call_script, tiny_data, tmp_path
):
    expected = uninterrupted(call_script, tiny_data, tmp_path / "uninterrupted", workers=1)
    run_id, kept = cut_short_by_a_scheduler(run_script, tiny_data, tmp_path)
    shutil.rmtree(kept)  # what a store that lost its artifacts leaves
    again = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--workers", "1", *COMMON), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_started_again(tmp_path, expected, again.stdout, run_id, "its kept state is gone")


@pytest.mark.slow
def test_a_trial_whose_kept_state_no_longer_fits_the_network_starts_again(
    run_script, call_script, tiny_data, tmp_path, monkeypatch
):
    run_id, _ = cut_short_by_a_scheduler(run_script, tiny_data, tmp_path)
    monkeypatch.setenv("TINY_EXTRA_FILTERS", "2")  # the network edited between the two runs
    expected = uninterrupted(call_script, tiny_data, tmp_path / "uninterrupted", workers=1)
    again = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--workers", "1", *COMMON), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_started_again(tmp_path, expected, again.stdout, run_id, "its kept state does not fit the network")
    assert "Error(s) in loading state_dict for Classifier" in again.stdout


@pytest.mark.slow
def test_a_trial_that_fails_past_its_resume_attempts_keeps_no_state(run_script, tiny_data, tmp_path):
    """Its worker killed twice, with --resume-attempts 1: taken up once from its last epoch, then
    failed, and the state it kept is deleted with it."""
    args = tune_args(tiny_data, "--n-trials", "2", "--workers", "2", "--resume-attempts", "1", *COMMON)
    for hold_at in (HELD_AT, HELD_AT + 1):  # the second time, in the epoch after the one it went on from
        hold = tmp_path / f"held at {hold_at}"
        env = {"TINY_HOLD_AT_EPOCH": str(hold_at), "TINY_HOLD_FILE": str(hold)}
        process = run_script("tune.py", *args, background=True, env=env)
        wait_for(lambda hold=hold: hold.exists() and hold.read_text(), what="a trial held", process=process)
        os.kill(int(hold.read_text()), signal.SIGKILL)
        stdout, _ = process.communicate(timeout=120)
    [dead] = [t for t in read_trials(f"sqlite:///{tmp_path / 'optuna.db'}") if t.state == TrialState.FAIL]
    assert dead.user_attrs[studies.CUT_SHORT_ATTR]["times"] == 1 and dead.user_attrs[studies.KEPT_ATTR]
    assert "cut short 2 times, more than --resume-attempts 1" in dead.user_attrs["fail_reason"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(dead.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and "kept" not in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_a_worker_that_finds_its_trial_finished_as_it_keeps_an_epoch_writes_no_more_to_the_run(
    tiny_settings, tracking_uri
):
    """A worker paused between its look at the trial and its write of the epoch it kept finds,
    when it goes on, the trial finished by the process that took it up: Optuna refuses the write.
    The run is that process's now: no curve nor time of this worker's lands in it after that."""
    import dataclasses

    from pytorch_lightning.callbacks import Callback

    from conftest import TINY
    from tiny import experiment as tiny
    from tunetrack.machinery.options import TuneOptions
    from tunetrack.machinery.study.pruning import ReportToTrial
    from tunetrack.machinery.tracking.mlflow_runs import connect
    from tunetrack.machinery.training.fit import TrackedRun, fit

    class FinishedMeanwhile(Callback):  # as KeepEachEpoch meets it, at the second epoch's start
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise optuna.exceptions.UpdateFinishedTrialError("Trial#0 has already finished")

    trial = optuna.create_study().ask()
    settings = dataclasses.replace(tiny_settings, max_epochs=4)
    tracker = connect(tracking_uri, "finished meanwhile")
    options = TuneOptions(accelerator="cpu").resolved(settings)
    with tracker.run("trial 0", finished_on=(optuna.exceptions.UpdateFinishedTrialError,)) as run_id:
        callbacks = [ReportToTrial(trial, lambda: None, "val_loss"), FinishedMeanwhile()]
        run = TrackedRun(tracker, run_id, options, TINY.trainer, callbacks, progress_bar=False)
        model, data = tiny.build(settings)
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            fit(model, data, settings, run, test=False)
    logged = tracker.client.get_run(run_id).data.metrics
    assert [m.step for m in tracker.client.get_metric_history(run_id, "val_loss")] == [0]
    assert not [name for name in logged if name.startswith("time_")], logged
