"""What a study keeps in its Optuna storage (study/storage.py): what it is (its definition,
which a continuation must match), its MLflow parent runs, each trial's records, and the trials
that a killed process left RUNNING. The default storage is ``sqlite:///optuna.db`` in the
working directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time
import uuid
import warnings

import optuna
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import BaseStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tunetrack.machinery.objectives import Objective
from tunetrack.machinery.options import flag
from tunetrack.machinery.runtime.interrupts import alive

# The study's user attributes: its identity, what makes its trials comparable, and its MLflow
# parent run in each tracking store.
UID_ATTR, DEFINITION_ATTR, PARENT_RUN_ATTR = "uid", "definition", "mlflow_parent_run"
# The trial's user attribute that names the process running it; the one that says how often and
# why it was cut short (its worker killed, its machine gone or asked to stop), and from which epoch
# it goes on; and the one that names its last kept epoch's state (machinery.training.resumption).
WORKER_ATTR, CUT_SHORT_ATTR, KEPT_ATTR = "worker", "cut_short", "kept_state"
# The trial's user attributes that name its MLflow run and hold the settings it trained with,
# and the run's tags that name its study and trial.
RUN_ATTR, SETTINGS_ATTR = "mlflow_run_id", "settings"
# The trial's user attribute that holds its best epoch's metrics (machinery.objectives); and the
# one that says why a trial cut short started again from its first epoch.
METRICS_ATTR, RESTARTED_ATTR = "metrics", "restarted"
STUDY_UID_TAG, TRIAL_TAG = "optuna.study_uid", "optuna.trial"
# How long a process that finds a study just created by another one waits for its records.
CREATOR_SECONDS = 30


class StudyMismatch(ValueError):
    """A continuation would mix trials trained differently; ``flag`` is the setting that differs."""

    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag


class TakenOver(Exception):
    """Another process finished this trial while this one still ran it: a worker that stopped
    sending heartbeats for longer than the grace period (a machine paused, cut off from the
    database) comes back to find its trial failed and its run closed. Those records are the
    other process's now, and stay as they are."""


def definition(session_settings, space: dict[str, BaseDistribution], options, data: str) -> dict:
    """What makes the trials of a study comparable: how each trains, in every setting the search
    does not choose (but those marked compared=False: the seed only changes which points are
    tried), the data's fingerprint, the search space, what it optimizes, and how it searches."""
    settings = {
        field.name: getattr(session_settings, field.name)
        for field in dataclasses.fields(session_settings)
        if field.name not in space and field.metadata.get("compared", True)
    }
    flags = {field.name: flag(field) for field in dataclasses.fields(session_settings)}
    return {
        "settings": settings,
        "flags": flags,
        "data": data,
        "space": {name: distribution_to_json(d) for name, d in space.items()},
        "objective": options.goal.record(),
        "search": {
            "sampler": options.sampler,
            "pruner": options.pruner if options.pruning else "none",
            **({"fixed": {name: getattr(session_settings, name) for name in options.fixed}} if options.fixed else {}),
        },
    }


def open_study(storage: RDBStorage, name: str, wanted: dict) -> tuple[optuna.Study, bool]:
    """The study ``name``, created with the definition ``wanted`` if it does not exist; return it
    and whether this call created it.

    Creating a study is atomic (its name is unique in the storage), so of several processes
    that start at the same moment exactly one creates it, and records its identity and
    definition; the others wait a moment for those records. A continuation whose definition
    differs raises StudyMismatch before anything in the storage changes.
    """
    objective = Objective.recorded(wanted)
    try:
        storage.create_new_study([StudyDirection[d.upper()] for d in objective.directions], name)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    study = optuna.load_study(study_name=name, storage=storage)
    if created:
        with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
            study.set_metric_names(list(objective.names))  # what optuna-dashboard calls the objectives
        study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
        study.set_user_attr(DEFINITION_ATTR, wanted)
        return study, True
    recorded = wait_for_creator(study, DEFINITION_ATTR)
    if recorded is None:  # a study from before studies recorded their definition
        study.set_user_attr(DEFINITION_ATTR, wanted)
    else:
        _check_definition(name, recorded, wanted)
    if UID_ATTR not in study.user_attrs:
        study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
    return study, False


def objective_of(study: optuna.Study) -> Objective:
    """What the study optimizes, as its definition records it."""
    return Objective.recorded(study.user_attrs.get(DEFINITION_ATTR) or {})


def uid(study: optuna.Study) -> str:
    """The study's own identity: unlike its name, never shared with another study."""
    return study.user_attrs[UID_ATTR]


def wait_for_creator(study: optuna.Study, attr: str):
    """A user attribute that the process creating the study records a moment after creating it.
    A study with a trial begun had its chance long ago: it gets no wait. A trial that waits to
    begin does not count: the creator enqueues the study's first points before it records all."""
    deadline = time.monotonic() + CREATOR_SECONDS
    while attr not in (attrs := study.user_attrs) and not _begun(study) and time.monotonic() < deadline:
        time.sleep(0.1)
    return attrs.get(attr)


def _begun(study: optuna.Study) -> bool:
    return any(trial.state != TrialState.WAITING for trial in study.get_trials(deepcopy=False))


def _check_definition(name: str, recorded: dict, wanted: dict) -> None:
    was, now = Objective.recorded(recorded), Objective.recorded(wanted)
    if was != now:
        raise StudyMismatch(
            "--objective",
            f"study {name!r} optimizes {was}, not {now}: continue it with --objective {was.spec}, or start another "
            "study with a new --study-name",
        )
    for key, value in wanted["settings"].items():
        was = recorded["settings"].get(key, value)
        if was != value:
            flag_ = wanted["flags"].get(key, f"--{key.replace('_', '-')}")
            raise StudyMismatch(
                flag_,
                f"study {name!r} trains every trial with {key}={was}, not {value}: its trials would not compare; "
                f"continue it with {flag_} {was}, or start another study with a new --study-name",
            )
    if recorded["data"] != wanted["data"]:
        raise StudyMismatch(
            "--study-name",
            f"study {name!r} was trained on other files (fingerprint {recorded['data']}, here {wanted['data']}); "
            "start another study with a new --study-name",
        )
    if recorded["space"] != wanted["space"]:
        changed = sorted(set(recorded["space"].items()) ^ set(wanted["space"].items()))
        raise StudyMismatch(
            "--study-name",
            f"study {name!r} searched another space than the experiment's now ({', '.join(dict(changed))} "
            "differ); start another study with a new --study-name",
        )
    fixed = recorded.get("search", {}).get("fixed", {}), wanted["search"].get("fixed", {})
    if fixed[0] != fixed[1]:
        raise StudyMismatch(
            "--study-name",
            f"study {name!r} fixes {_values(fixed[0]) or 'nothing'} and searches the rest, not "
            f"{_values(fixed[1]) or 'nothing'}: continue it with the same flags, or start another with --study-name",
        )
    for key, value in wanted["search"].items():
        was = recorded.get("search", {}).get(key, value)
        if key != "fixed" and was != value:
            flag_ = "--no-pruning" if "none" in (was, value) and key == "pruner" else f"--{key}"
            raise StudyMismatch(
                flag_,
                f"study {name!r} searches with the {key} {was}, not {value}: continue it with the same, or start "
                "another study with a new --study-name",
            )


def _values(chosen: dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in chosen.items())


def worker_id() -> dict[str, object]:
    """Who runs a trial: recorded on it, so that a trial of a dead process can be told apart.
    Containers can share a host name and not their process ids: the pid namespace says whose
    pids these are."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pids": _pid_namespace()}


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None  # not Linux


def take_back_dead_trials(
    storage: RDBStorage, study_name: str, grace: int, attempts: int, silent: bool = False
) -> list[FrozenTrial]:
    """Hand back to the study (WAITING, see :func:`cut_short`) the RUNNING trials whose worker is
    gone, or mark them FAIL where they may not be taken up again; return them as they are now.

    A worker records itself on its trial first thing. A trial of this machine whose process is
    gone, or one that recorded no worker a grace period after it started (its worker stopped
    before the objective began), is dead; with ``silent``, so is one of any machine whose
    heartbeat stopped for the grace period (only its own machine can tell sooner).
    """
    study_id = storage.get_study_id_from_name(study_name)
    stale = set(storage._get_stale_trial_ids(study_id)) if silent else set()
    taken = []
    now = datetime.datetime.now()
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(WORKER_ATTR)
        if owner is None:
            dead = (now - trial.datetime_start).total_seconds() > grace
        else:
            here = owner["host"] == socket.gethostname() and owner.get("pids") == _pid_namespace()
            dead = here and not alive(owner["pid"])
        if dead:
            why = "its worker process died"
        elif trial._trial_id in stale:
            why = f"its heartbeat stopped for over {grace} s"
        else:
            continue
        resumes = may_resume(trial, attempts)
        try:
            if not resumes:  # why it failed, while it can still be written
                cut_short(storage, trial, why, attempts, resumes)
            if not storage.end_attempt(trial, TrialState.WAITING if resumes else TrialState.FAIL):
                continue  # another process got there first, or a worker took it up
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if resumes:
            cut_short(storage, trial, why, attempts, resumes)
        taken.append(storage.get_trial(trial._trial_id))
    return taken


def may_resume(trial: FrozenTrial, attempts: int) -> bool:
    """Whether a trial cut short once more may still be taken up again: ``attempts`` times in all."""
    return trial.user_attrs.get(CUT_SHORT_ATTR, {}).get("times", 0) < attempts


def cut_short(storage: BaseStorage, trial: FrozenTrial, why: str, attempts: int, resumes: bool) -> None:
    """Record on ``trial`` that it was cut short, ``why``, and from which epoch it goes on; or, one
    that does not resume, why it failed."""
    times = trial.user_attrs.get(CUT_SHORT_ATTR, {}).get("times", 0) + 1
    if resumes:
        kept = trial.user_attrs.get(KEPT_ATTR)
        epoch = kept["epoch"] + 1 if kept else 0
        storage.set_trial_user_attr(trial._trial_id, CUT_SHORT_ATTR, {"times": times, "why": why, "epoch": epoch})
    else:
        tries = f"; cut short {times} times, more than --resume-attempts {attempts}" if attempts else ""
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", why + tries)


def resumes_from(trial: FrozenTrial) -> str:
    """What a trial that was handed back says of itself: why, and the epoch it goes on from."""
    cut = trial.user_attrs.get(CUT_SHORT_ATTR, {})
    return f"cut short ({cut.get('why', '?')}): it resumes from epoch {cut.get('epoch', 0) + 1} on the next free worker"


def metrics_of(trial: FrozenTrial) -> dict[str, float]:
    """A complete trial's best epoch's metrics, the objective's first; a trial of a study from
    before trials recorded them has its val_loss (its value) and val_acc."""
    if METRICS_ATTR in trial.user_attrs:
        return dict(trial.user_attrs[METRICS_ATTR])
    if trial.state != TrialState.COMPLETE or "val_acc" not in trial.user_attrs:
        return {}
    return {"val_loss": trial.value, "val_acc": trial.user_attrs["val_acc"]}


# The trials that count toward a study's total (--until): those that ended with a result, and
# those under way, which will (a trial cut short, WAITING, goes on from where it stopped).
TOWARD_TOTAL = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def toward_total(storage: BaseStorage, study_name: str) -> int:
    """How many of the study's trials count toward its total (TOWARD_TOTAL)."""
    study_id = storage.get_study_id_from_name(study_name)
    return len(storage.get_all_trials(study_id, deepcopy=False, states=TOWARD_TOTAL))


def finished_trials(storage: RDBStorage, study_name: str) -> list[FrozenTrial]:
    study_id = storage.get_study_id_from_name(study_name)
    return [t for t in storage.get_all_trials(study_id, deepcopy=False) if t.state.is_finished()]
