"""The study's Optuna storage: an RDBStorage (SQLite, PostgreSQL, MySQL) with heartbeats on, that
waits out a database server which stops answering, and every use of Optuna's private API the
study makes (named, with where and why, in tests/test_sharing.py).

SQLite serializes writers; a trial writes a few rows per epoch, so the handful of workers one
machine runs wait on each other for milliseconds, and the busy timeout below makes them wait
instead of failing. Many machines share one PostgreSQL or MySQL server instead.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import threading
import time
import warnings
from collections.abc import Callable

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from tunetrack.machinery.tracking import stores

# How long a SQLite writer waits for another one before giving up, in seconds.
SQLITE_BUSY_TIMEOUT = 120


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


_CONNECTION_ERRORS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
# The storages a call of this process ran out of patience with: until one answers again, the
# next calls to it, from any PatientStorage (tune.py's, and a single worker's in its process),
# try once, not for as long again.
_given_up: set[str] = set()


def _patient(method: Callable, name: str | None = None) -> Callable:
    """``method`` (an RDBStorage's, or one of this module's that stands for ``name``), retried."""
    name = name or method.__name__

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

    # Every public call of Optuna's storage API, retried (tests/test_sharing.py checks that none
    # is missing from an Optuna that adds one).
    check_trial_is_updatable = _patient(RDBStorage.check_trial_is_updatable)
    create_new_study = _patient(RDBStorage.create_new_study)
    create_new_trial = _patient(RDBStorage.create_new_trial)
    delete_study = _patient(RDBStorage.delete_study)
    get_all_studies = _patient(RDBStorage.get_all_studies)
    get_all_trials = _patient(RDBStorage.get_all_trials)
    get_best_trial = _patient(RDBStorage.get_best_trial)
    get_n_trials = _patient(RDBStorage.get_n_trials)
    get_study_directions = _patient(RDBStorage.get_study_directions)
    get_study_id_from_name = _patient(RDBStorage.get_study_id_from_name)
    get_study_name_from_id = _patient(RDBStorage.get_study_name_from_id)
    get_study_system_attrs = _patient(RDBStorage.get_study_system_attrs)
    get_study_user_attrs = _patient(RDBStorage.get_study_user_attrs)
    get_trial = _patient(RDBStorage.get_trial)
    get_trial_id_from_study_id_trial_number = _patient(RDBStorage.get_trial_id_from_study_id_trial_number)
    get_trial_number_from_id = _patient(RDBStorage.get_trial_number_from_id)
    get_trial_param = _patient(RDBStorage.get_trial_param)
    get_trial_params = _patient(RDBStorage.get_trial_params)
    get_trial_system_attrs = _patient(RDBStorage.get_trial_system_attrs)
    get_trial_user_attrs = _patient(RDBStorage.get_trial_user_attrs)
    remove_session = _patient(RDBStorage.remove_session)
    set_study_system_attr = _patient(RDBStorage.set_study_system_attr)
    set_study_user_attr = _patient(RDBStorage.set_study_user_attr)
    set_trial_intermediate_value = _patient(RDBStorage.set_trial_intermediate_value)
    set_trial_param = _patient(RDBStorage.set_trial_param)
    set_trial_system_attr = _patient(RDBStorage.set_trial_system_attr)
    set_trial_user_attr = _patient(RDBStorage.set_trial_user_attr)
    # Optuna wraps an RDBStorage in its _CachedStorage, which calls some of the backend's private
    # methods directly: a trial's parameters went through _set_trial_param unretried, and a
    # PostgreSQL restart failed the trial that was being suggested.
    _create_new_trial = _patient(RDBStorage._create_new_trial)
    _set_trial_param = _patient(RDBStorage._set_trial_param)
    _get_trials = _patient(RDBStorage._get_trials)
    _get_best_trial_id = _patient(RDBStorage._get_best_trial_id)
    record_heartbeat = _patient(RDBStorage.record_heartbeat)
    # Its own: a trial's end as Optuna's optimize() records it, stale trials, and compare-and-set.
    set_trial_state_values = _patient(_set_state, "set_trial_state_values")
    _get_stale_trial_ids = _patient(_stale_trial_ids, "_get_stale_trial_ids")
    end_attempt = _patient(_end_attempt, "end_attempt")
