"""One trial of a study: the experiment's objective, inside an MLflow run of its own nested
under the study's run, with a fit() that trains as train.py does and hands each epoch's value
of the objective to the pruner; and one line that says how the trial ended."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import pytorch_lightning as pl
import torch
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from pytorch_lightning.callbacks import Callback

from tunetrack.machinery.contract import Experiment
from tunetrack.machinery.objectives import MEASURED, shown
from tunetrack.machinery.runtime import devices, interrupts
from tunetrack.machinery.study import studies
from tunetrack.machinery.study.space import format_value, width
from tunetrack.machinery.study.storage import hand_back_when_told, leave_when_told
from tunetrack.machinery.study.studies import (
    METRICS_ATTR,
    RESTARTED_ATTR,
    RUN_ATTR,
    SETTINGS_ATTR,
    STUDY_UID_TAG,
    TRIAL_TAG,
)
from tunetrack.machinery.study.time_split import SESSION_TAG
from tunetrack.machinery.tracking.mlflow_runs import Tracker
from tunetrack.machinery.tracking.stores import ServerUnavailable, reason
from tunetrack.machinery.training.fit import THREADS, EpochMetricsLogger, FitResult, TrainingDiverged, fit
from tunetrack.machinery.training.resumption import KEPT_FOLDER, KeepEachEpoch, KeptStateUnusable


class ObjectiveMismatch(RuntimeError):
    """The experiment's objective returned another number than its best epoch's value of the
    objective: a study would compare, prune and register by a number under another's name."""


class TakenOver(Exception):
    """Another process finished this trial while this one still ran it: a worker that stopped
    sending heartbeats for longer than the grace period (a machine paused, cut off from the
    database) comes back to find its trial failed and its run closed. Those records are the
    other process's now, and stay as they are."""


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


def objective(trial: optuna.Trial, session: Session, tracker: Tracker, storage: RDBStorage) -> float:
    """Run the experiment's objective for ``trial``; its value is the best epoch's value of the
    objective (``options.goal``).

    Why a trial did not complete is kept with it: ``pruned`` or ``fail_reason``. A trial cut short
    by a scheduler or a closed terminal (SIGTERM, SIGHUP) or by its tune.py's end is handed back
    to the study, to go on from its last epoch (see machinery.training.resumption), as often as
    ``--resume-attempts`` allows; Ctrl-C, a person's, fails it.
    """
    try:
        value = _train(trial, session, tracker, storage)
        _forget_kept(trial, tracker)
        return value
    except optuna.TrialPruned as pruned:
        _keep(trial, "pruned", str(pruned))
        _forget_kept(trial, tracker)
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
            _forget_kept(trial, tracker)
        raise
    except BaseException as error:
        _keep(trial, "fail_reason", str(error))
        _forget_kept(trial, tracker)
        raise


def _forget_kept(trial: optuna.Trial, tracker: Tracker) -> None:
    """A trial that ended needs no state to go on from: its run keeps the curves and the best epoch."""
    if studies.KEPT_ATTR in trial.user_attrs:
        with contextlib.suppress(ServerUnavailable):
            tracker.delete_artifacts(trial.user_attrs[RUN_ATTR], str(KEPT_FOLDER))


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
        kept, run_id, resume_from, restart = _taken_up(trial, tracker, folder, restart)
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


def _taken_up(trial: optuna.Trial, tracker: Tracker, folder: str, restart: str | None):
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


# Optimizer steps a trial takes before it is judged against chance.
JUDGED_AFTER_STEPS = 50


class ReportToTrial(Callback):
    """Hands each epoch's ``metric`` (the objective's) to Optuna and stops the trial when the
    pruner says so; with ``metric`` None (a study of two objectives, which Optuna does not
    prune), only checks that the trial is still this process's. Whatever the pruner, a trial
    whose val_loss after its first epoch is no lower than ``chance`` (the cross-entropy of
    guessing every class alike, ln of their number; None with --no-pruning) learned nothing,
    and is pruned there: a learning rate so high stays at chance to its last epoch. An epoch of
    fewer than JUDGED_AFTER_STEPS optimizer steps (a few hundred pictures in large batches) is
    too little to judge by: the first epoch by which the trial has taken that many is.

    Optuna's own Lightning callback (optuna-integration) imports the ``lightning.pytorch``
    namespace, whose Trainer does not accept ``pytorch_lightning`` modules.
    """

    def __init__(self, trial: optuna.Trial, still_ours: Callable[[], None], metric: str | None,
                 chance: float | None = None):  # fmt: skip
        self.trial, self.still_ours, self.metric, self.chance = trial, still_ours, metric, chance
        self.judged = chance is None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch, metrics = trainer.current_epoch, trainer.callback_metrics
        value = float(metrics[self.metric]) if self.metric in metrics else None
        last_epoch = epoch == trainer.max_epochs - 1  # pruning now would save nothing
        try:
            with interrupts.held():  # the study's storage is written and read here
                self.still_ours()
                prune = False
                if value is not None:
                    self.trial.report(value, step=epoch)
                    prune = not last_epoch and self.trial.should_prune()
        except optuna.exceptions.UpdateFinishedTrialError:
            raise TakenOver from None
        if not self.judged and trainer.global_step >= JUDGED_AFTER_STEPS and "val_loss" in metrics:
            self.judged, loss = True, float(metrics["val_loss"])
            if loss >= self.chance and not last_epoch:
                raise optuna.TrialPruned(
                    f"pruned after epoch {epoch + 1}: val_loss {loss:.4f} is no better than chance "
                    f"({self.chance:.4f}, guessing every class alike)"
                )
        if prune:
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} at {self.metric} {value:.4f}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, TakenOver):  # from here or from KeepEachEpoch, before the loggers' last write
            for logger in trainer.loggers:  # the run is the other process's: no more curves in it
                if isinstance(logger, EpochMetricsLogger):
                    logger.forget()


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


@dataclass(frozen=True)
class TrialReport:
    """What a worker tells about a finished trial: enough for one line of output."""

    number: int
    state: str
    params: dict
    distributions: dict[str, BaseDistribution]
    metrics: dict[str, float]  # at its best epoch (none for a trial that did not complete)
    seconds: float
    note: str = ""
    gpu: str = ""  # the GPU that trained it, as CUDA_VISIBLE_DEVICES names it; "" on a CPU

    @classmethod
    def of(cls, trial: FrozenTrial, note: str = "") -> TrialReport:
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        attrs = trial.user_attrs
        if trial.state == TrialState.WAITING:
            note = note or studies.resumes_from(trial)
        note = note or attrs.get("pruned") or attrs.get("fail_reason") or attrs.get("stopped_early", "")
        if attrs.get(RESTARTED_ATTR) and trial.state.is_finished():
            note = "; ".join(filter(None, [f"started again from epoch 1: {attrs[RESTARTED_ATTR]}", note]))
        return cls(
            trial.number,
            trial.state.name,
            trial.params,
            trial.distributions,
            studies.metrics_of(trial),
            seconds,
            note,
            # This process's GPU, for a trial it ran itself (not another process's, found dead).
            devices.this_process_id() if attrs.get(studies.WORKER_ATTR) == studies.worker_id() else "",
        )

    def line(self, objective: tuple[str, ...] = ()) -> str:
        """One line: the trial's number, state, point, and its scores, those of ``objective`` first
        (params and latency_ms only where they are objectives)."""
        params = " ".join(
            f"{name}={format_value(value):>{width(self.distributions.get(name))}}"
            for name, value in self.params.items()
        )
        metrics = {k: v for k, v in self.metrics.items() if k in objective or k not in MEASURED}
        scores = (
            " ".join(filter(None, [shown(metrics, objective), self.note]))
            if self.state == TrialState.COMPLETE.name
            else self.note
        )
        gpu = f"  gpu {self.gpu}" if self.gpu else ""
        return f"trial {self.number:>3} {self.state:<8} {params}  {scores}  {self.seconds:5.1f} s{gpu}"
