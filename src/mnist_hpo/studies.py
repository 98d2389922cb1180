"""Where a study lives: its Optuna storage, its parent MLflow run, and the clean-up of trials
and runs that a killed process left open.

The default storage is ``sqlite:///optuna.db`` in the working directory. SQLite serializes
writers; a trial writes a few rows per epoch, so the handful of workers one machine runs
wait on each other for milliseconds, and the busy timeout below makes them wait instead of
failing. Many machines share one PostgreSQL or MySQL server instead.
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from collections.abc import Callable

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from mnist_hpo.tracking import Tracker

DEFAULT_STORAGE = "sqlite:///optuna.db"
# How long a SQLite writer waits for another one before giving up, in seconds.
SQLITE_BUSY_TIMEOUT = 120
# A worker's trial records a heartbeat this often; a trial silent for the grace period belongs
# to a dead worker (on any machine) and is marked failed by the next worker to start a trial.
HEARTBEAT_SECONDS, GRACE_SECONDS = 10, 60
PARENT_RUN_ATTR = "mlflow_parent_run"
WORKER_ATTR = "worker"


def open_storage(url: str, on_stale_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> RDBStorage:
    """An RDBStorage for ``url`` (SQLite, PostgreSQL, MySQL, ...), with heartbeats on."""
    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        # Heartbeats are "experimental" in Optuna 5, and relied on here knowingly.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=on_stale_trial,
        )


def worker_id() -> dict[str, object]:
    """Who runs a trial: recorded on it, so that a trial of a dead process can be told apart."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def fail_dead_trials(storage: RDBStorage, study_name: str) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker is gone; return their numbers.

    A worker records itself on its trial first thing. A trial of this machine whose process is
    gone, or one that recorded no worker a grace period after it started (its worker stopped
    before the objective began), is dead. Trials of other machines are left to the heartbeat:
    only their own machine can tell whether their process still runs.
    """
    study_id = storage.get_study_id_from_name(study_name)
    failed = []
    now = datetime.datetime.now()
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(WORKER_ATTR)
        if owner is None:
            dead = (now - trial.datetime_start).total_seconds() > GRACE_SECONDS
        else:
            dead = owner["host"] == socket.gethostname() and not _is_alive(owner["pid"])
        if not dead:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", "its worker process died")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process got there first
        failed.append(trial.number)
    return failed


def close_runs_of_finished_trials(tracker: Tracker, storage: RDBStorage, study_name: str) -> list[str]:
    """End, as KILLED, every MLflow run still RUNNING whose trial is no longer running."""
    running = tracker.client.search_runs(
        [tracker.experiment_id], f"attributes.status = 'RUNNING' AND tags.`optuna.study` = {study_name!r}"
    )
    if not running:
        return []
    study_id = storage.get_study_id_from_name(study_name)
    trials = {t.user_attrs.get("mlflow_run_id"): t for t in storage.get_all_trials(study_id, deepcopy=False)}
    closed = []
    for run in running:
        trial = trials.get(run.info.run_id)  # the study's own run has no trial
        if trial is not None and trial.state != TrialState.RUNNING:
            close_run_of_failed_trial(tracker, trial)
            closed.append(run.info.run_id)
    return closed


def close_run_of_failed_trial(tracker: Tracker, trial: FrozenTrial) -> None:
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        reason = trial.user_attrs.get("fail_reason", "its worker stopped sending heartbeats")
        tracker.set_tags(run_id, {"optuna.state": trial.state.name, "error": f"trial failed: {reason}"})
        tracker.client.set_terminated(run_id, "KILLED")


def parent_run(tracker: Tracker, study: optuna.Study, params: dict[str, object]) -> str:
    """The study's MLflow parent run, created on first use and reopened when the study continues.

    Its id is kept with the study, per tracking URI; a second process starting at the same
    moment reads back whichever id was stored last and drops its own run.
    """
    recorded = study.user_attrs.get(PARENT_RUN_ATTR, {})
    run_id = recorded.get(tracker.tracking_uri)
    if run_id and _run_exists(tracker, run_id):
        tracker.client.update_run(run_id, status="RUNNING")
        return run_id
    run_id = tracker.client.create_run(
        tracker.experiment_id, run_name=study.study_name, tags={"optuna.study": study.study_name}
    ).info.run_id
    tracker.log_params(run_id, params)
    study.set_user_attr(PARENT_RUN_ATTR, {**recorded, tracker.tracking_uri: run_id})
    winner = study.user_attrs[PARENT_RUN_ATTR][tracker.tracking_uri]  # read back from the storage
    if winner != run_id:
        tracker.client.delete_run(run_id)
        tracker.client.update_run(winner, status="RUNNING")
    return winner


def _run_exists(tracker: Tracker, run_id: str) -> bool:
    try:
        return tracker.client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001 - MLflow raises its own exception for a missing run
        return False
