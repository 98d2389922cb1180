"""One trial of a study: the experiment's objective, inside an MLflow run of its own nested
under the study's run, with a fit() that trains as train.py does and hands each epoch's value
of the objective to the pruner (pruning.py); taken up where it was cut short (kept_state.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
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
from tunetrack.machinery.training.fit import THREADS, FitResult, TrainingDiverged, fit
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
            return _in_run(trial, session, tracker, storage, run_id, kept, resume_from, me)


def _in_run(trial, session: Session, tracker: Tracker, storage: RDBStorage, run_id: str, kept: dict | None,
            resume_from: str | None, me: dict) -> float:  # fmt: skip
    """The trial's objective, in its open MLflow run ``run_id``, going on from ``resume_from``."""

    def still_ours() -> None:
        if storage.get_trial(trial._trial_id).user_attrs.get(studies.WORKER_ATTR) != me:
            raise TakenOver  # handed back while this worker was away, and taken up by another

    def record_kept(epoch: int, artifact: str) -> None:
        trial.set_user_attr(studies.KEPT_ATTR, {"epoch": epoch, "artifact": artifact})

    trial.set_user_attr(RUN_ATTR, run_id)
    keeping = session.options.resume_attempts > 0
    fitted: list[FitResult] = []

    def fit_in_this_run(model: pl.LightningModule, data: pl.LightningDataModule, settings) -> FitResult:
        with interrupts.held():
            trial.set_user_attr(SETTINGS_ATTR, dataclasses.asdict(settings))
            if not kept:
                trial.set_user_attr(THREADS, torch.get_num_threads())  # train.py --from-trial trains with as many
        after = kept and kept["artifact"]
        keep = [KeepEachEpoch(tracker, run_id, record_kept, still_ours, after)] if keeping else []
        pruned_by = None if session.options.goal.several else session.options.goal.first
        classes = len(getattr(data, "classes", ()))
        chance = math.log(classes) if classes > 1 and session.options.pruning else None
        with _threads(trial.user_attrs.get(THREADS) if kept else None):  # the order of its sums, as before
            fitted.append(fit(
                model,
                data,
                settings,
                session.options,
                tracker,
                run_id,
                trainer_arguments=session.experiment.trainer(settings),
                callbacks=[ReportToTrial(trial, still_ours, pruned_by, chance), *keep],
                evaluate_test=False,
                progress_bar=session.options.verbose,
                resume_from=resume_from,
            ))  # fmt: skip
        return fitted[-1]  # the test set is never used to choose

    try:
        with interrupts.interruptible():
            value = session.experiment.objective(trial, session.settings, fit_in_this_run)
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
    if fitted and not _same(value, fitted[-1].value):
        goal = session.options.goal
        raise ObjectiveMismatch(
            f"the experiment's objective returned {_shown(value)}, not its best epoch's {goal.spec} "
            f"({_shown(fitted[-1].value)}): it returns fit(...).value; to optimize another metric, --objective "
            "(docs/objectives.md)"
        )
    try:
        if fitted:  # the last writes to the trial, just before its run is closed
            trial.set_user_attr(METRICS_ATTR, fitted[-1].metrics)
            trial.set_user_attr("best_epoch", fitted[-1].best_epoch)
            if fitted[-1].stopped_early:
                trial.set_user_attr("stopped_early", fitted[-1].stopped_early)
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
