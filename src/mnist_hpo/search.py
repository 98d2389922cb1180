"""What a study searches, and how: the search space, the sampler, the pruner and the objective.

Every trial is one call of :func:`mnist_hpo.training.fit` (the function scripts/train.py runs)
inside its own MLflow run, nested under the study's parent run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import optuna
import pytorch_lightning as pl
from optuna.trial import FrozenTrial, TrialState
from pytorch_lightning.callbacks import Callback

from mnist_hpo import interrupts, studies
from mnist_hpo.config import TrainConfig
from mnist_hpo.tracking import Tracker
from mnist_hpo.training import fit


def suggest_config(trial: optuna.Trial, max_epochs: int, seed: int, val_size: int) -> TrainConfig:
    """The search space: the write-up's three hyperparameters and their ranges."""
    return TrainConfig(
        batch_size=trial.suggest_categorical("batch_size", [32, 64, 128, 256]),
        hidden_dim=trial.suggest_int("hidden_dim", 32, 512),
        lr=trial.suggest_float("lr", 1e-4, 1e-1, log=True),
        max_epochs=max_epochs,
        # Each trial trains from its own seed, derived from the study's, so a study replays.
        seed=seed + trial.number,
        val_size=val_size,
    )


@dataclass(frozen=True)
class TuneSettings:
    """What every worker of one tune.py session shares."""

    study_name: str
    storage: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    data_dir: str = "data"
    data_source: str = "existing files"  # where tune.py found MNIST when it verified the files
    max_epochs: int = 10
    val_size: int = 5_000
    seed: int = 0
    pruning: bool = True
    accelerator: str = "auto"
    verbose: bool = False
    trials_before: int = 0  # trials the study held when this session started
    # Only tests set this: a pruner to use instead of the default one.
    pruner: optuna.pruners.BasePruner | None = field(default=None, compare=False)


def make_pruner(settings: TuneSettings) -> optuna.pruners.BasePruner:
    if settings.pruner is not None:
        return settings.pruner
    if not settings.pruning:
        return optuna.pruners.NopPruner()
    # No trial is judged on its first two epochs, nor before five trials have finished.
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)


def make_sampler(settings: TuneSettings, worker: int) -> optuna.samplers.TPESampler:
    # One seed per (study seed, session, worker): one worker replays a fresh study exactly, a
    # continued study does not repeat its first trials, and workers do not propose twins.
    seed = int(np.random.SeedSequence([settings.seed, settings.trials_before, worker]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=seed)


class ReportToTrial(Callback):
    """Hands each epoch's val_loss to Optuna and stops the trial when the pruner says so.

    Optuna's own Lightning callback (optuna-integration) imports the ``lightning.pytorch``
    namespace, whose Trainer does not accept ``pytorch_lightning`` modules.
    """

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch, val_loss = trainer.current_epoch, float(trainer.callback_metrics["val_loss"])
        self.trial.report(val_loss, step=epoch)
        last_epoch = epoch == trainer.max_epochs - 1  # pruning now would save nothing
        if not last_epoch and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} at val_loss {val_loss:.4f}")


def objective(trial: optuna.Trial, settings: TuneSettings, tracker: Tracker) -> float:
    """Train the trial's configuration; its value is the best epoch's val_loss.

    Why a trial did not complete is kept with it: ``pruned`` or ``fail_reason``.
    """
    try:
        return _train(trial, settings, tracker)
    except optuna.TrialPruned as pruned:
        trial.set_user_attr("pruned", str(pruned))
        raise
    except BaseException as error:
        trial.set_user_attr("fail_reason", "interrupted" if isinstance(error, KeyboardInterrupt) else str(error))
        raise


def _train(trial: optuna.Trial, settings: TuneSettings, tracker: Tracker) -> float:
    trial.set_user_attr(studies.WORKER_ATTR, studies.worker_id())
    config = suggest_config(trial, settings.max_epochs, settings.seed, settings.val_size)
    tags = {"optuna.study": settings.study_name, "optuna.trial": str(trial.number)}
    with tracker.run(
        f"trial {trial.number}", parent_run_id=settings.parent_run_id, tags=tags, finished_on=(optuna.TrialPruned,)
    ) as run_id:
        trial.set_user_attr("mlflow_run_id", run_id)
        try:
            with interrupts.interruptible():
                result = fit(
                    config,
                    tracker,
                    run_id,
                    data_dir=settings.data_dir,
                    accelerator=settings.accelerator,
                    callbacks=[ReportToTrial(trial)],
                    evaluate_test=False,  # the test set is never used to choose
                    progress_bar=settings.verbose,
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


@dataclass(frozen=True)
class TrialReport:
    """What a worker tells about a finished trial: enough for one line of output."""

    number: int
    state: str
    params: dict
    value: float | None
    val_acc: float | None
    seconds: float
    note: str = ""

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialReport:
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        note = trial.user_attrs.get("pruned") or trial.user_attrs.get("fail_reason", "")
        return cls(
            trial.number, trial.state.name, trial.params, trial.value, trial.user_attrs.get("val_acc"), seconds, note
        )

    def line(self) -> str:
        p = self.params
        params = (
            f"batch_size={p.get('batch_size', '?'):>3} hidden_dim={p.get('hidden_dim', '?'):>3} "
            f"lr={p.get('lr', math.nan):.2e}"
        )
        scores = (
            f"val_loss {self.value:.4f} val_acc {self.val_acc:.4f}"
            if self.state == TrialState.COMPLETE.name
            else self.note
        )
        return f"trial {self.number:>3} {self.state:<8} {params}  {scores}  {self.seconds:5.1f} s"
