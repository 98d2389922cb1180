"""What a trial cut short keeps, to go on from: its last epoch's state, fetched when the trial is
taken up again, dropped when it ends; and the run of a trial whose worker died, closed.
(machinery.training.resumption keeps and loads that state.)"""

from __future__ import annotations

import contextlib

import optuna
from optuna.trial import FrozenTrial, TrialState

from tunetrack.machinery.study import studies
from tunetrack.machinery.study.studies import RUN_ATTR
from tunetrack.machinery.tracking.mlflow_runs import Tracker
from tunetrack.machinery.tracking.stores import ServerUnavailable, reason
from tunetrack.machinery.training.resumption import KEPT_FOLDER


def taken_up(trial: optuna.Trial, tracker: Tracker, folder: str, restart: str | None):
    """For a trial handed back to the study: ``(kept, run, checkpoint, None)``, the last epoch it
    kept, its run, reopened, to go on in, and that epoch's state fetched into ``folder``; or
    ``(None, the old run, None, why)`` where it starts again from its first epoch (``restart``,
    or its kept state gone); ``(None, None, None, None)`` for a new trial."""
    attrs = trial.user_attrs
    if studies.CUT_SHORT_ATTR not in attrs or RUN_ATTR not in attrs:
        return None, None, None, restart
    run_id, kept, cut = attrs[RUN_ATTR], attrs.get(studies.KEPT_ATTR), attrs[studies.CUT_SHORT_ATTR]
    if restart or not kept:
        return None, run_id, None, restart
    try:
        checkpoint = tracker.download_artifact(run_id, kept["artifact"], folder)
    except ServerUnavailable:
        raise
    except Exception as error:  # noqa: BLE001 - MLflow says "not found" in several ways
        return None, run_id, None, f"its kept state is gone ({reason(error)})"
    if not tracker.reopen(run_id):
        return None, run_id, None, None  # its run is gone: from the start, in a new one
    tracker.set_tags(run_id, {"resumed": f"from epoch {kept['epoch'] + 2} after it was cut short "
                              f"({cut['why']}), {cut['times']} time(s)"})  # fmt: skip
    return kept, run_id, checkpoint, None


def forget(trial: optuna.Trial, tracker: Tracker) -> None:
    """A trial that ended needs no state to go on from: its run keeps the curves and the best epoch."""
    if studies.KEPT_ATTR in trial.user_attrs:
        with contextlib.suppress(ServerUnavailable):
            tracker.delete_artifacts(trial.user_attrs[RUN_ATTR], str(KEPT_FOLDER))


def close_run(tracker: Tracker, trial: FrozenTrial, run_id: str | None = None) -> None:
    """End, as KILLED, the MLflow run (``run_id``, or the one the trial names) of a trial that
    another process found dead; KILLED even if its curves were complete, since the trial
    never recorded its result. A trial handed back reopens it when it is taken up; one that
    failed (past --resume-attempts) keeps no state to go on from."""
    run_id = run_id or trial.user_attrs.get(RUN_ATTR)
    if run_id and trial.state == TrialState.WAITING:
        tracker.end_run(run_id, "KILLED", {"optuna.state": "WAITING", "error": studies.resumes_from(trial)})
    elif run_id:
        why = trial.user_attrs.get("fail_reason", "its worker stopped sending heartbeats")
        tracker.end_run(run_id, "KILLED", {"optuna.state": trial.state.name, "error": f"trial failed: {why}"})
        if trial.user_attrs.get(studies.KEPT_ATTR):  # it ended: no state to go on from is worth its space
            tracker.delete_artifacts(run_id, str(KEPT_FOLDER))
