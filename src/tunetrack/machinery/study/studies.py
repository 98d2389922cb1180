"""Where a study lives: its Optuna storage, the records kept with it, and the trials that a
killed process left RUNNING.

The default storage is ``sqlite:///optuna.db`` in the working directory. SQLite serializes
writers; a trial writes a few rows per epoch, so the handful of workers one machine runs
wait on each other for milliseconds, and the busy timeout below makes them wait instead of
failing. Many machines share one PostgreSQL or MySQL server instead.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable

import optuna
import sqlalchemy.exc
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import BaseStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tunetrack.machinery.objectives import Objective
from tunetrack.machinery.options import flag
from tunetrack.machinery.runtime.interrupts import alive
from tunetrack.machinery.tracking import stores

# How long a SQLite writer waits for another one before giving up, in seconds.
SQLITE_BUSY_TIMEOUT = 120
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


def open_storage(
    url: str,
    grace: int,
    on_stale_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    patience: float = 0,
) -> RDBStorage:
    """An RDBStorage for ``url`` (SQLite, PostgreSQL, MySQL, ...), with heartbeats on: a trial
    silent for ``grace`` seconds belongs to a dead worker (on any machine) and is marked failed
    by the next worker to start a trial. It waits out a server that stops answering for up to
    ``patience`` seconds."""
    # pool_pre_ping: a connection that a database restart cut is replaced before it is used.
    is_sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}} if is_sqlite else {"pool_pre_ping": True}

    def create() -> RDBStorage:
        with warnings.catch_warnings():
            # Heartbeats are "experimental" in Optuna 5, and relied on here knowingly.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return PatientStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=max(1, min(10, grace // 4)),
                grace_period=grace,
                heartbeat_stale_trial_callback=on_stale_trial,
                patience=patience,
            )

    return stores.create_once(url, create, lambda new: RDBStorage(new, engine_kwargs=engine_kwargs).engine.dispose())


class PatientStorage(RDBStorage):
    """An RDBStorage whose every call is made again, with growing pauses, while its database
    server does not answer (a restart, a network blink), for up to ``patience`` seconds; then
    it raises ServerUnavailable, which names the server.

    A call that reached the server but whose answer was lost may run twice. Every call is an
    upsert or a read but three: a trial created twice leaves one RUNNING trial without a worker,
    which the clean-up fails after the grace period; a study created twice is found to exist;
    and a trial's end recorded twice is taken as recorded.
    """

    def __init__(self, url: str, *, patience: float, **kwargs):
        self._url, self._patience = url, patience
        self._sqlite = url.startswith("sqlite")
        super().__init__(url, **kwargs)

    def _transient(self, error: BaseException) -> bool:
        cause = error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) else error
        if self._sqlite:
            return isinstance(cause, sqlalchemy.exc.DBAPIError) and "database is locked" in str(cause)
        # A session whose connection a restart cut mid-transaction refuses every later use
        # until it is rolled back; the retry starts from a new session (see _patient).
        if isinstance(cause, sqlalchemy.exc.PendingRollbackError):
            return True
        if not isinstance(cause, sqlalchemy.exc.DBAPIError):
            return False
        return cause.connection_invalidated or isinstance(cause, _CONNECTION_ERRORS)


_CONNECTION_ERRORS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
# The storages a call of this process ran out of patience with: until one answers again, the
# next calls to it, from any PatientStorage (tune.py's, and a single worker's in its process),
# try once, not for as long again.
_given_up: set[str] = set()


def _patient(name: str, method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self: PatientStorage, *args, **kwargs):
        if getattr(_inside, "active", False):  # a call made by another: the outer one retries
            return method(self, *args, **kwargs)
        deadline, pause = time.monotonic() + (0 if self._url in _given_up else self._patience), 0.25
        _inside.active = True
        try:
            for attempt in itertools.count():
                try:
                    result = method(self, *args, **kwargs)
                    _given_up.discard(self._url)
                    return result
                except optuna.exceptions.UpdateFinishedTrialError:
                    if attempt and name == "set_trial_state_values":
                        return True  # the first try was recorded; its answer was lost
                    raise
                except Exception as error:
                    if not self._transient(error):
                        raise
                    if time.monotonic() + pause > deadline:
                        _given_up.add(self._url)
                        if name == "record_heartbeat":
                            return None  # a missed heartbeat: the trial's own calls will say why
                        raise stores.ServerUnavailable(
                            f"the Optuna storage {stores.public(self._url)} did not answer for "
                            f"{self._patience:.0f} s: {stores.reason(error.__cause__ or error, self._url)}"
                        ) from None
                    self.scoped_session.remove()  # the next try gets a new session, and connection
                    time.sleep(pause)
                    pause = min(pause * 2, 8)
        finally:
            _inside.active = False

    return call


_inside = threading.local()
# What Optuna's optimize() records instead of a FAIL, for trials of this process's that were cut
# short (WAITING) or taken up by another worker (None: nothing).
_when_told: dict[tuple[str, int], TrialState | None] = {}


def hand_back_when_told(storage: RDBStorage, trial_id: int) -> None:
    """Have the end that Optuna's optimize() is about to record for a trial this process runs (a
    FAIL: its objective was stopped) put the trial back in the queue instead, WAITING, for the
    next ask() of any worker of the study to take up. optimize() ends every trial it started."""
    _when_told[storage.url, trial_id] = TrialState.WAITING


def leave_when_told(storage: RDBStorage, trial_id: int) -> None:
    """Have optimize() record nothing for a trial that another worker took up meanwhile."""
    _when_told[storage.url, trial_id] = None


def _set_state(self: RDBStorage, trial_id: int, state: TrialState, values=None) -> bool:
    if state != TrialState.FAIL or (self.url, trial_id) not in _when_told:
        return RDBStorage.set_trial_state_values(self, trial_id, state, values)
    instead = _when_told[self.url, trial_id]
    done = instead is None or RDBStorage.set_trial_state_values(self, trial_id, instead, values)
    del _when_told[self.url, trial_id]
    return done


def _stale_trial_ids(self: RDBStorage, study_id: int) -> list[int]:
    """Optuna's stale trials, but those started within the grace period: a trial taken up again
    is RUNNING anew while its heartbeat is still the one its last worker left."""
    recent = datetime.datetime.now() - datetime.timedelta(seconds=self.grace_period)
    return [i for i in RDBStorage._get_stale_trial_ids(self, study_id) if self.get_trial(i).datetime_start < recent]


def _end_attempt(self: RDBStorage, seen: FrozenTrial, state: TrialState) -> bool:
    """Set a RUNNING trial WAITING or FAIL if it is still the attempt ``seen``: RUNNING since the
    same moment. Of two processes that find the same dead trial, one ends it; and a trial that a
    worker took up meanwhile is left to that worker."""
    # No public call of Optuna's compares and sets a trial's state.
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(self.scoped_session) as session:
        row = models.TrialModel.find_or_raise_by_id(seen._trial_id, session, for_update=True)
        if row.state != TrialState.RUNNING or row.datetime_start != seen.datetime_start:
            return False
        row.state = state
        if state.is_finished():
            row.datetime_complete = datetime.datetime.now()
    return True


# Optuna wraps an RDBStorage in its _CachedStorage, which calls some of the backend's private
# methods directly: a trial's parameters went through _set_trial_param unretried, and a
# PostgreSQL restart failed the trial that was being suggested.
_CALLED_BY_OPTUNAS_CACHE = ["_create_new_trial", "_set_trial_param", "_get_trials", "_get_best_trial_id"]
_CALLED_BY_OPTUNAS_CACHE += ["record_heartbeat", "_get_stale_trial_ids"]
_OWN = {"set_trial_state_values": _set_state, "_get_stale_trial_ids": _stale_trial_ids, "end_attempt": _end_attempt}
for _name in [n for n in dir(BaseStorage) if not n.startswith("_")] + _CALLED_BY_OPTUNAS_CACHE + ["end_attempt"]:
    setattr(PatientStorage, _name, _patient(_name, _OWN.get(_name) or getattr(RDBStorage, _name)))


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
    recorded = _wait_for(study, DEFINITION_ATTR)
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


def _wait_for(study: optuna.Study, attr: str):
    """A user attribute that the process creating the study records a moment after creating it.
    A study with trials had its chance long ago: it gets no wait."""
    deadline = time.monotonic() + CREATOR_SECONDS
    while attr not in (attrs := study.user_attrs) and not study.trials and time.monotonic() < deadline:
        time.sleep(0.1)
    return attrs.get(attr)


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


def recorded_parent_runs(study: optuna.Study, wait: bool = False) -> dict[str, str]:
    """The study's parent runs, by tracking store; with ``wait``, give the process that
    created the study a moment to record its run."""
    return (_wait_for(study, PARENT_RUN_ATTR) if wait else study.user_attrs.get(PARENT_RUN_ATTR)) or {}


def record_parent_run(study: optuna.Study, store: str, run_id: str) -> str:
    """Record ``run_id`` as the study's parent run in ``store``; return the one recorded now.

    Two processes that record at the same moment read back whichever id was stored last.
    """
    study.set_user_attr(PARENT_RUN_ATTR, {**study.user_attrs.get(PARENT_RUN_ATTR, {}), store: run_id})
    return study.user_attrs[PARENT_RUN_ATTR][store]  # read back from the storage
