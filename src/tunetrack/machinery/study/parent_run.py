"""The study's MLflow parent run, one in each tracking store it is tracked in: created with the
study, reopened when it continues, made anew (saying so) where a store lost it; and the store a
continued study keeps its runs in.

Its id is a user attribute of the study (studies.PARENT_RUN_ATTR), by store, so that every
process of the study, on any machine, nests its trials' runs under the same one.
"""

from __future__ import annotations

import os
import time

import optuna

from tunetrack.machinery.study import studies
from tunetrack.machinery.study.studies import STUDY_UID_TAG
from tunetrack.machinery.tracking.mlflow_runs import Tracker, TrackingUnavailable, connect, default_tracking_uri
from tunetrack.machinery.tracking.stores import public, sqlite_path


class StudysStoreUnavailable(TrackingUnavailable):
    """The MLflow store a continued study keeps its runs in cannot be opened."""


def connect_own_store(store: str, experiment: str) -> Tracker:
    """The study's own MLflow store (own_store's), opened; StudysStoreUnavailable if it cannot be."""
    try:
        return connect(store, experiment)
    except TrackingUnavailable as error:
        raise StudysStoreUnavailable(str(error)) from None


def own_store(study: optuna.Study, options, wait: bool) -> str | None:
    """The MLflow store that a continued study keeps its runs in, where the command named none and
    MLflow's default here is another (it was run from another folder): the study's, if it is a
    file that is there; else None, for the store the command would use. A store named by
    --tracking-uri or MLFLOW_TRACKING_URI is the one used."""
    if options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    recorded = recorded_runs(study, wait=wait)
    if not recorded or public(default_tracking_uri()) in recorded:
        return None
    theirs = [uri for uri in recorded if (path := sqlite_path(uri)) is not None and path.is_file()]
    if theirs:
        print(f"study {study.study_name!r} keeps its MLflow runs in {theirs[0]}: so does this session "
              "(--tracking-uri chooses another store)", flush=True)  # fmt: skip
    return theirs[0] if theirs else None


def open_run(tracker: Tracker, study: optuna.Study, uid: str, created: bool, params: dict, notes: list[str]) -> str:
    """The study's MLflow parent run in this tracking store: created with the study, reopened
    when the study continues, and created anew (saying so) when the store lost it.

    Only the process that created the study creates its run; one that found the study just
    created waits for that run. Where a run must be made later (a store that lost it, or
    another store), two processes starting at the same moment agree on one run
    (record_run()), and the other drops its own.
    """
    store, name = public(tracker.tracking_uri), study.study_name
    recorded = recorded_runs(study, wait=not created)
    # This store's run first; then the others', as one server reached by two addresses (a
    # machine behind a gateway, say) is one store, and run ids are unique across stores.
    for run_id in sorted(recorded.values(), key=lambda run_id: run_id != recorded.get(store)):
        if tracker.reopen(run_id):
            return run_id
    if store in recorded:
        notes.append(
            f"the MLflow store {store} has no run of study {name!r} (its parent run {recorded[store]} is gone): a "
            "new parent run starts there; earlier trials keep their Optuna records, not their curves"
        )
        print(notes[-1], flush=True)
    older = [
        run
        for run in tracker.runs_tagged("optuna.study", name)
        if "mlflow.parentRunId" not in run.data.tags and run.data.tags.get(STUDY_UID_TAG) != uid
    ]
    if older:
        notes.append(
            f"a new study {name!r} began beside {len(older)} older one(s) of the same name in this MLflow "
            f"experiment: its runs are named '{name} ({uid[:8]})' and carry the tag {STUDY_UID_TAG}={uid}"
        )
        print(notes[-1], flush=True)
    run_id = tracker.create_run(
        f"{name} ({uid[:8]})" if older else name, tags={"optuna.study": name, STUDY_UID_TAG: uid}
    )
    tracker.log_params(run_id, params)
    # The creator is the only writer (a study is created once): it needs no time to settle.
    winner = record_run(study, store, run_id, recorded.get(store), settle=0 if created else 1)
    if winner != run_id:
        tracker.delete_run(run_id)
        tracker.reopen(winner)
    return winner


def recorded_runs(study: optuna.Study, wait: bool = False) -> dict[str, str]:
    """The study's parent runs, by tracking store; with ``wait``, give the process that
    created the study a moment to record its run."""
    attr = studies.PARENT_RUN_ATTR
    return (studies.wait_for_creator(study, attr) if wait else study.user_attrs.get(attr)) or {}


def record_run(study: optuna.Study, store: str, run_id: str, replacing: str | None, settle: float = 0) -> str:
    """Record ``run_id`` as the study's parent run in ``store`` in place of ``replacing`` (the run
    found there before ``run_id`` was made, or None); return the run to use.

    Optuna's storage has no compare-and-set, so: a run another process recorded meanwhile is
    used instead of this one; and after writing, ``settle`` seconds pass before reading back, so
    that two processes whose writes land within that time both read the last one.
    """
    recorded = study.user_attrs.get(studies.PARENT_RUN_ATTR, {})
    if recorded.get(store) not in (None, replacing):
        return recorded[store]
    study.set_user_attr(studies.PARENT_RUN_ATTR, {**recorded, store: run_id})
    time.sleep(settle)
    return study.user_attrs[studies.PARENT_RUN_ATTR][store]  # read back from the storage
