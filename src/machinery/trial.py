"""One trial of a study: the experiment's objective, inside an MLflow run of its own nested
under the study's run, with a fit() that trains as train.py does and hands each epoch's
val_loss to the pruner; and one line that says how the trial ended."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import optuna
import pytorch_lightning as pl
import torch
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState
from pytorch_lightning.callbacks import Callback

from machinery import interrupts, studies
from machinery.contract import Experiment
from machinery.retraining import THREADS
from machinery.space import format_value, width
from machinery.stores import ServerUnavailable
from machinery.tracking import Tracker
from machinery.training import EpochMetricsLogger, FitResult, fit

# The trial's user attributes that name its MLflow run and hold the settings it trained with,
# and the run's tags that name its study and trial.
RUN_ATTR, SETTINGS_ATTR = "mlflow_run_id", "settings"
STUDY_UID_TAG, TRIAL_TAG = "optuna.study_uid", "optuna.trial"


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


def objective(trial: optuna.Trial, session: Session, tracker: Tracker) -> float:
    """Run the experiment's objective for ``trial``; its value is the best epoch's val_loss.

    Why a trial did not complete is kept with it: ``pruned`` or ``fail_reason``.
    """
    try:
        return _train(trial, session, tracker)
    except optuna.TrialPruned as pruned:
        _keep(trial, "pruned", str(pruned))
        raise
    except TakenOver:
        raise  # its record is the other process's
    except BaseException as error:
        _keep(trial, "fail_reason", interrupts.reason() if isinstance(error, KeyboardInterrupt) else str(error))
        raise


def _keep(trial: optuna.Trial, key: str, value) -> None:
    """Record why the trial ended, unless another process has ended it meanwhile."""
    try:
        trial.set_user_attr(key, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        raise TakenOver from None


def _train(trial: optuna.Trial, session: Session, tracker: Tracker) -> float:
    trial.set_user_attr(studies.WORKER_ATTR, studies.worker_id())
    name = session.options.study_name
    tags = {"optuna.study": name, STUDY_UID_TAG: session.study_uid, TRIAL_TAG: str(trial.number)}
    with tracker.run(
        f"trial {trial.number}",
        parent_run_id=session.parent_run_id,
        tags=tags,
        finished_on=(optuna.TrialPruned,),
        left_alone_on=(TakenOver,),
    ) as run_id:
        trial.set_user_attr(RUN_ATTR, run_id)
        fitted: list[FitResult] = []

        def fit_in_this_run(model: pl.LightningModule, data: pl.LightningDataModule, settings) -> FitResult:
            with interrupts.held():
                trial.set_user_attr(SETTINGS_ATTR, dataclasses.asdict(settings))
                trial.set_user_attr(THREADS, torch.get_num_threads())  # train.py --from-trial trains with as many
            fitted.append(
                fit(
                    model,
                    data,
                    settings,
                    session.options,
                    tracker,
                    run_id,
                    trainer_arguments=session.experiment.trainer(settings),
                    callbacks=[ReportToTrial(trial)],
                    evaluate_test=False,
                    progress_bar=session.options.verbose,
                )  # fmt: skip
            )  # the test set is never used to choose
            return fitted[-1]

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
        except BaseException:
            with contextlib.suppress(ServerUnavailable):  # the error that ended the trial is the one to say
                tracker.set_tags(run_id, {"optuna.state": "FAIL"})
            raise
        try:
            if fitted:  # the last writes to the trial, just before its run is closed
                trial.set_user_attr("val_acc", fitted[-1].val_acc)
                trial.set_user_attr("best_epoch", fitted[-1].best_epoch)
                if fitted[-1].stopped_early:
                    trial.set_user_attr("stopped_early", fitted[-1].stopped_early)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise TakenOver from None
        tracker.set_tags(run_id, {"optuna.state": "COMPLETE"})
    return value


class ReportToTrial(Callback):
    """Hands each epoch's val_loss to Optuna and stops the trial when the pruner says so.

    Optuna's own Lightning callback (optuna-integration) imports the ``lightning.pytorch``
    namespace, whose Trainer does not accept ``pytorch_lightning`` modules.
    """

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch, val_loss = trainer.current_epoch, float(trainer.callback_metrics["val_loss"])
        last_epoch = epoch == trainer.max_epochs - 1  # pruning now would save nothing
        try:
            with interrupts.held():  # the study's storage is written and read here
                self.trial.report(val_loss, step=epoch)
                prune = not last_epoch and self.trial.should_prune()
        except optuna.exceptions.UpdateFinishedTrialError:
            for logger in trainer.loggers:  # the run is the other process's: no more curves in it
                if isinstance(logger, EpochMetricsLogger):
                    logger.forget()
            raise TakenOver from None
        if prune:
            raise optuna.TrialPruned(f"pruned after epoch {epoch} at val_loss {val_loss:.4f}")


def close_run(tracker: Tracker, trial: FrozenTrial, run_id: str | None = None) -> None:
    """End, as KILLED, the MLflow run (``run_id``, or the one the trial names) of a trial that
    another process found dead; KILLED even if its curves were complete, since the trial
    never recorded its result."""
    run_id = run_id or trial.user_attrs.get(RUN_ATTR)
    if run_id:
        reason = trial.user_attrs.get("fail_reason", "its worker stopped sending heartbeats")
        tracker.end_run(run_id, "KILLED", {"optuna.state": trial.state.name, "error": f"trial failed: {reason}"})


@dataclass(frozen=True)
class TrialReport:
    """What a worker tells about a finished trial: enough for one line of output."""

    number: int
    state: str
    params: dict
    distributions: dict[str, BaseDistribution]
    value: float | None
    val_acc: float | None
    seconds: float
    note: str = ""

    @classmethod
    def of(cls, trial: FrozenTrial, note: str = "") -> TrialReport:
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        attrs = trial.user_attrs
        note = note or attrs.get("pruned") or attrs.get("fail_reason") or attrs.get("stopped_early", "")
        return cls(
            trial.number,
            trial.state.name,
            trial.params,
            trial.distributions,
            trial.value,
            trial.user_attrs.get("val_acc"),
            seconds,
            note,
        )

    def line(self) -> str:
        params = " ".join(
            f"{name}={format_value(value):>{width(self.distributions.get(name))}}"
            for name, value in self.params.items()
        )
        scores = (
            " ".join(filter(None, [f"val_loss {self.value:.4f} val_acc {self.val_acc:.4f}", self.note]))
            if self.state == TrialState.COMPLETE.name
            else self.note
        )
        return f"trial {self.number:>3} {self.state:<8} {params}  {scores}  {self.seconds:5.1f} s"
