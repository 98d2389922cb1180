"""One trial of a study: train the configuration the sampler proposes with the function
train.py uses, inside an MLflow run of its own nested under the study's run; hand each epoch's
val_loss to the pruner; and say in one line how it ended."""

from __future__ import annotations

from dataclasses import dataclass

import optuna
import pytorch_lightning as pl
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from pytorch_lightning.callbacks import Callback

from mnist_hpo import interrupts, studies
from mnist_hpo.config import TrainConfig
from mnist_hpo.search import format_value, suggest_config
from mnist_hpo.tracking import Tracker
from mnist_hpo.training import fit

# The trial's user attribute that names its MLflow run, and the run's tags that name its study
# and trial.
RUN_ATTR = "mlflow_run_id"
STUDY_UID_TAG, TRIAL_TAG = "optuna.study_uid", "optuna.trial"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one tune.py session shares."""

    base: TrainConfig  # its epochs, validation size and seed; the searched fields are replaced
    study_name: str
    study_uid: str  # the study's identity, on every run: names can repeat and hold any quote
    parent_run_id: str
    data_dir: str
    accelerator: str = "auto"
    verbose: bool = False  # Lightning's progress bar inside the trial


def objective(trial: optuna.Trial, setup: TrialSetup, tracker: Tracker) -> float:
    """Train the trial's configuration; its value is the best epoch's val_loss.

    Why a trial did not complete is kept with it: ``pruned`` or ``fail_reason``.
    """
    try:
        return _train(trial, setup, tracker)
    except optuna.TrialPruned as pruned:
        trial.set_user_attr("pruned", str(pruned))
        raise
    except BaseException as error:
        trial.set_user_attr("fail_reason", "interrupted" if isinstance(error, KeyboardInterrupt) else str(error))
        raise


def _train(trial: optuna.Trial, setup: TrialSetup, tracker: Tracker) -> float:
    trial.set_user_attr(studies.WORKER_ATTR, studies.worker_id())
    config = suggest_config(trial, setup.base)
    tags = {"optuna.study": setup.study_name, STUDY_UID_TAG: setup.study_uid, TRIAL_TAG: str(trial.number)}
    with tracker.run(
        f"trial {trial.number}", parent_run_id=setup.parent_run_id, tags=tags, finished_on=(optuna.TrialPruned,)
    ) as run_id:
        trial.set_user_attr(RUN_ATTR, run_id)
        try:
            with interrupts.interruptible():
                result = fit(
                    config,
                    tracker,
                    run_id,
                    data_dir=setup.data_dir,
                    accelerator=setup.accelerator,
                    callbacks=[ReportToTrial(trial)],
                    evaluate_test=False,  # the test set is never used to choose
                    progress_bar=setup.verbose,
                )
        except optuna.TrialPruned as pruned:
            tracker.set_tags(run_id, {"optuna.state": "PRUNED", "pruned": str(pruned)})
            raise
        except BaseException:
            tracker.set_tags(run_id, {"optuna.state": "FAIL"})
            raise
        trial.set_user_attr("val_acc", result.val_acc)
        trial.set_user_attr("best_epoch", result.best_epoch)
        tracker.set_tags(run_id, {"optuna.state": "COMPLETE"})
    return result.val_loss


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
        with interrupts.held():  # the study's storage is written and read here
            self.trial.report(val_loss, step=epoch)
            prune = not last_epoch and self.trial.should_prune()
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
        note = note or trial.user_attrs.get("pruned") or trial.user_attrs.get("fail_reason", "")
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
            f"{name}={format_value(value):>{_width(self.distributions.get(name))}}"
            for name, value in self.params.items()
        )
        scores = (
            f"val_loss {self.value:.4f} val_acc {self.val_acc:.4f}"
            if self.state == TrialState.COMPLETE.name
            else self.note
        )
        return f"trial {self.number:>3} {self.state:<8} {params}  {scores}  {self.seconds:5.1f} s"


def _width(distribution: BaseDistribution | None) -> int:
    """Characters that every value of ``distribution`` fits in, so that the lines align."""
    if isinstance(distribution, CategoricalDistribution):
        return max(len(format_value(choice)) for choice in distribution.choices)
    if isinstance(distribution, IntDistribution):
        return len(str(distribution.high))
    return len(format_value(1.0))
