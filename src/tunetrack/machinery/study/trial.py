"""One trial of a study: the experiment's objective, inside an MLflow run of its own nested
under the study's run, with a fit() that trains as train.py does and hands each epoch's value
of the objective to the pruner (pruning.py); taken up where it was cut short (kept_state.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import pytorch_lightning as pl
import torch
from optuna.storages import RDBStorage

from tunetrack.machinery.contract import Experiment
from tunetrack.machinery.runtime import interrupts
from tunetrack.machinery.study import kept_state, studies
from tunetrack.machinery.study.pruning import ReportToTrial
from tunetrack.machinery.study.storage import hand_back_when_told, leave_when_told
from tunetrack.machinery.study.studies import (
    METRICS_ATTR,
    RESTARTED_ATTR,
    RUN_ATTR,
    SETTINGS_ATTR,
    STUDY_UID_TAG,
    TRIAL_TAG,
    TakenOver,
)
from tunetrack.machinery.study.time_split import SESSION_TAG
from tunetrack.machinery.tracking.mlflow_runs import Tracker
from tunetrack.machinery.tracking.stores import ServerUnavailable
from tunetrack.machinery.training.fit import THREADS, TrackedRun, TrainingDiverged, lightnings_exit_as_interrupt
from tunetrack.machinery.training.resumption import KeepEachEpoch, KeptStateUnusable


class ObjectiveMismatch(RuntimeError):
    """The experiment's objective returned another number than its best epoch's value of the
    objective: a study would compare, prune and register by a number under another's name."""


@dataclass(frozen=True)
class Session:
    """What every trial of one tune.py session shares, in this process or in a worker's."""

    experiment: Experiment
    settings: Any  # how every trial trains; the objective sets the searched settings and the seed
    options: Any  # the session's TuneOptions, resolved
    tracking_uri: str
    experiment_id: str  # MLflow's
    study_uid: str  # the study's identity, on every run: names can repeat and hold any quote
    parent_run_id: str
    deadline: float | None = None  # time.time() after which a worker starts no more trials
    session_id: str = ""  # which tune.py session: its trials' runs say so (time_split.SESSION_TAG)


def run_trial(trial: optuna.Trial, session: Session, tracker: Tracker, storage: RDBStorage) -> float:
    """Run the experiment's objective for ``trial``; its value is the best epoch's value of the
    objective (``options.goal``).

    Why a trial did not complete is kept with it: ``pruned`` or ``fail_reason``. A trial cut short
    by a scheduler or a closed terminal (SIGTERM, SIGHUP) or by its tune.py's end is handed back
    to the study, to go on from its last epoch (see machinery.training.resumption), as often as
    ``--resume-attempts`` allows; Ctrl-C, a person's, fails it.
    """
    try:
        value = _train(trial, session, tracker, storage)
        kept_state.forget(trial, tracker)
        return value
    except optuna.TrialPruned as pruned:
        _keep(trial, "pruned", str(pruned))
        kept_state.forget(trial, tracker)
        raise
    except TakenOver:
        leave_when_told(storage, trial._trial_id)  # its record is the other process's
        raise
    except KeyboardInterrupt:
        seen = storage.get_trial(trial._trial_id)
        resumes = _cut_short() and studies.may_resume(seen, session.options.resume_attempts)
        with interrupts.held():
            if resumes:
                studies.cut_short(storage, seen, interrupts.reason(), session.options.resume_attempts, resumes)
                hand_back_when_told(storage, trial._trial_id)
            else:
                _keep(trial, "fail_reason", interrupts.reason())
        if not resumes:
            kept_state.forget(trial, tracker)
        raise
    except BaseException as error:
        _keep(trial, "fail_reason", str(error))
        kept_state.forget(trial, tracker)
        raise


def _cut_short() -> bool:
    """Whether this process is being stopped by something other than a person's Ctrl-C: a
    scheduler, a closed terminal, or its tune.py's end (which a worker takes as a SIGTERM)."""
    return interrupts.requested() in (signal.SIGTERM, signal.SIGHUP)


def _keep(trial: optuna.Trial, key: str, value) -> None:
    """Record why the trial ended, unless another process has ended it meanwhile."""
    try:
        trial.set_user_attr(key, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        raise TakenOver from None


class _StartAgain(Exception):
    """The trial's kept state turned out unusable as it was loaded: its run is closed, and the
    trial starts again from its first epoch, in a new one."""


def _train(trial: optuna.Trial, session: Session, tracker: Tracker, storage: RDBStorage) -> float:
    """Train the trial: from where it was cut short, if it was and its kept state can be used;
    else from its first epoch, saying why (a trial cut short always ends in a result or in its
    own failure, never in the study's)."""
    try:
        return _attempt(trial, session, tracker, storage)
    except _StartAgain as why:
        return _attempt(trial, session, tracker, storage, restart=str(why))


def _attempt(trial: optuna.Trial, session: Session, tracker: Tracker, storage: RDBStorage,
             restart: str | None = None) -> float:  # fmt: skip
    me = studies.worker_id()
    trial.set_user_attr(studies.WORKER_ATTR, me)
    name = session.options.study_name
    tags = {"optuna.study": name, STUDY_UID_TAG: session.study_uid, TRIAL_TAG: str(trial.number),
            SESSION_TAG: session.session_id}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="taken-up-") as folder:
        kept, run_id, resume_from, restart = kept_state.taken_up(trial, tracker, folder, restart)
        if restart:  # what it kept is of no use: from the start, and never from that state again
            trial.set_user_attr(studies.KEPT_ATTR, None)
            trial.set_user_attr(RESTARTED_ATTR, restart)
            tags["restarted"] = f"{restart}: it started again from epoch 1"
        if kept:
            opened = tracker.closing(run_id, finished_on=(optuna.TrialPruned,), left_alone_on=(TakenOver, _StartAgain))
        else:
            if run_id:  # cut short before it kept an epoch: from the start, in a run that says what it continues
                tags["continues"] = run_id
            opened = tracker.run(f"trial {trial.number}", parent_run_id=session.parent_run_id, tags=tags,
                                 finished_on=(optuna.TrialPruned,), left_alone_on=(TakenOver,))  # fmt: skip
        with opened as run_id:
            trial.set_user_attr(RUN_ATTR, run_id)
            run = _TrialRun(tracker, run_id, session.options, session.experiment.trainer,
                            progress_bar=session.options.verbose, resume_from=resume_from, trial=trial,
                            storage=storage, kept=kept, worker=me)  # fmt: skip
            return _in_run(run, session)


@dataclass
class _TrialRun(TrackedRun):
    """A trial's TrackedRun: its Trainer also hands each epoch to the pruner and keeps each
    epoch's state, to go on from if the trial is cut short; and the settings it trains with are
    recorded on the trial first."""

    trial: optuna.Trial | None = None
    storage: RDBStorage | None = None
    kept: dict | None = None  # the epoch it goes on from (resume_from's)
    worker: dict | None = None  # the process running it, as the trial names it (studies.WORKER_ATTR)

    def __post_init__(self) -> None:
        options = self.options
        pruned_by = None if options.goal.several else options.goal.first
        keep = KeepEachEpoch(
            self.tracker, self.run_id, self.record_kept, self.still_ours, self.kept and self.kept["artifact"]
        )
        self.callbacks = [ReportToTrial(self.trial, self.still_ours, pruned_by, options.pruning),
                          *([keep] if options.resume_attempts > 0 else [])]  # fmt: skip

    def trainer(self, settings) -> pl.Trainer:
        with interrupts.held():
            self.trial.set_user_attr(SETTINGS_ATTR, dataclasses.asdict(settings))
            if not self.kept:
                self.trial.set_user_attr(THREADS, torch.get_num_threads())  # train.py --from-trial trains with as many
        return super().trainer(settings)

    def still_ours(self) -> None:
        if self.storage.get_trial(self.trial._trial_id).user_attrs.get(studies.WORKER_ATTR) != self.worker:
            raise TakenOver  # handed back while this worker was away, and taken up by another

    def record_kept(self, epoch: int, artifact: str) -> None:
        self.trial.set_user_attr(studies.KEPT_ATTR, {"epoch": epoch, "artifact": artifact})


def _in_run(run: _TrialRun, session: Session) -> float:
    """The experiment's objective for the trial, in its open MLflow run, going on from
    ``run.resume_from``; with the torch threads it trained with before, where it goes on (the
    order of its sums, as before). The test set is never used to choose."""
    trial, tracker, run_id = run.trial, run.tracker, run.run_id

    try:
        with interrupts.interruptible(), lightnings_exit_as_interrupt():
            with _threads(trial.user_attrs.get(THREADS) if run.kept else None):
                value = session.experiment.objective(trial, session.settings, run)
    except optuna.TrialPruned as pruned:
        tracker.set_tags(run_id, {"optuna.state": "PRUNED", "pruned": str(pruned)})
        raise
    except optuna.exceptions.UpdateFinishedTrialError:
        raise TakenOver from None  # Optuna refused a write: another process finished the trial
    except TakenOver:
        raise
    except TrainingDiverged as diverged:  # its loss is no number: no epoch after this one would be
        tracker.set_tags(run_id, {"optuna.state": "PRUNED", "pruned": f"pruned {diverged}"})
        raise optuna.TrialPruned(f"pruned {diverged}") from None
    except KeptStateUnusable as unusable:  # found as it was loaded, before an epoch was trained
        tracker.end_run(run_id, "KILLED", {"optuna.state": "WAITING", "error": f"{unusable}: the trial started "
                                           "again from epoch 1, in a run of its own"})  # fmt: skip
        raise _StartAgain(str(unusable)) from None
    except KeyboardInterrupt:
        with contextlib.suppress(ServerUnavailable):
            tracker.set_tags(run_id, {"optuna.state": "WAITING" if _cut_short() else "FAIL"})
        raise
    except BaseException:
        with contextlib.suppress(ServerUnavailable):  # the error that ended the trial is the one to say
            tracker.set_tags(run_id, {"optuna.state": "FAIL"})
        raise
    fitted = run.result
    if fitted and not _same(value, fitted.value):
        goal = session.options.goal
        raise ObjectiveMismatch(
            f"the experiment's objective returned {_shown(value)}, not its best epoch's {goal.spec} "
            f"({_shown(fitted.value)}): it returns run.value; to optimize another metric, --objective "
            "(docs/objectives.md)"
        )
    try:
        if fitted:  # the last writes to the trial, just before its run is closed
            trial.set_user_attr(METRICS_ATTR, fitted.metrics)
            trial.set_user_attr("best_epoch", fitted.best_epoch)
            if fitted.stopped_early:
                trial.set_user_attr("stopped_early", fitted.stopped_early)
    except optuna.exceptions.UpdateFinishedTrialError:
        raise TakenOver from None
    tracker.set_tags(run_id, {"optuna.state": "COMPLETE"})
    return value


def _same(returned, expected) -> bool:
    """Whether the objective returned the value(s) its fit found (a tensor's or numpy's number too)."""
    try:
        got = tuple(float(v) for v in returned) if isinstance(expected, tuple) else (float(returned),)
    except (TypeError, ValueError):
        return False
    return got == (expected if isinstance(expected, tuple) else (expected,))


def _shown(value) -> str:
    try:
        return ", ".join(f"{float(v):.4f}" for v in (value if isinstance(value, (tuple, list)) else (value,)))
    except (TypeError, ValueError):
        return repr(value)


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Train with ``count`` threads (None: as many as now), and then as many as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(count or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)
