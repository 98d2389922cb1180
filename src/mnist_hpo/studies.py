"""Where a study lives: its Optuna storage, the records kept with it, and the trials that a
killed process left RUNNING.

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

DEFAULT_STORAGE = "sqlite:///optuna.db"
# How long a SQLite writer waits for another one before giving up, in seconds.
SQLITE_BUSY_TIMEOUT = 120
# A worker's trial records a heartbeat this often; a trial silent for the grace period belongs
# to a dead worker (on any machine) and is marked failed by the next worker to start a trial.
HEARTBEAT_SECONDS, GRACE_SECONDS = 10, 60
# The study's user attribute that names its MLflow parent run, per tracking store.
PARENT_RUN_ATTR = "mlflow_parent_run"
# The trial's user attribute that names the process running it.
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


def fail_dead_trials(storage: RDBStorage, study_name: str) -> list[FrozenTrial]:
    """Mark FAIL the RUNNING trials whose worker is gone; return them as they are now.

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
        failed.append(storage.get_trial(trial._trial_id))
    return failed


def finished_trials(storage: RDBStorage, study_name: str) -> list[FrozenTrial]:
    study_id = storage.get_study_id_from_name(study_name)
    return [t for t in storage.get_all_trials(study_id, deepcopy=False) if t.state.is_finished()]


def recorded_parent_run(study: optuna.Study, store: str) -> str | None:
    """The id of the study's parent run in the tracking store ``store``, if one was recorded."""
    return study.user_attrs.get(PARENT_RUN_ATTR, {}).get(store)


def record_parent_run(study: optuna.Study, store: str, run_id: str) -> str:
    """Record ``run_id`` as the study's parent run in ``store``; return the one recorded now.

    Two processes that record at the same moment read back whichever id was stored last.
    """
    study.set_user_attr(PARENT_RUN_ATTR, {**study.user_attrs.get(PARENT_RUN_ATTR, {}), store: run_id})
    return study.user_attrs[PARENT_RUN_ATTR][store]  # read back from the storage
