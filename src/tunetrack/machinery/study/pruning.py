"""The pruner's part in a trial: each epoch's value of the objective handed to Optuna, and a trial
stopped when the pruner says so, or when it learned nothing."""

from __future__ import annotations

import math
from collections.abc import Callable

import optuna
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from tunetrack.machinery.runtime import interrupts
from tunetrack.machinery.study.studies import TakenOver
from tunetrack.machinery.training.fit import EpochMetricsLogger

# Optimizer steps a trial takes before it is judged against chance.
JUDGED_AFTER_STEPS = 50


class ReportToTrial(Callback):
    """Hands each epoch's ``metric`` (the objective's) to Optuna and stops the trial when the
    pruner says so; with ``metric`` None (a study of two objectives, which Optuna does not
    prune), only checks that the trial is still this process's. Whatever the pruner, a trial
    whose val_loss after its first epoch is no lower than chance (the cross-entropy of guessing
    every class alike, ln of their number; not judged with --no-pruning) learned nothing,
    and is pruned there: a learning rate so high stays at chance to its last epoch. An epoch of
    fewer than JUDGED_AFTER_STEPS optimizer steps (a few hundred pictures in large batches) is
    too little to judge by: the first epoch by which the trial has taken that many is.

    Optuna's own Lightning callback (optuna-integration) imports the ``lightning.pytorch``
    namespace, whose Trainer does not accept ``pytorch_lightning`` modules.
    """

    def __init__(self, trial: optuna.Trial, still_ours: Callable[[], None], metric: str | None, judge: bool = True):
        self.trial, self.still_ours, self.metric, self.judge = trial, still_ours, metric, judge
        self.chance, self.judged = None, True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        classes = len(getattr(trainer.datamodule, "classes", ()))
        if self.judge and classes > 1:
            self.chance, self.judged = math.log(classes), False

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
        # From here or from KeepEachEpoch (a worker paused between its look at the trial and its
        # write of the epoch it kept finds the trial finished), before the loggers' last write.
        if isinstance(exception, (TakenOver, optuna.exceptions.UpdateFinishedTrialError)):
            for logger in trainer.loggers:  # the run is the other process's: no more curves in it
                if isinstance(logger, EpochMetricsLogger):
                    logger.forget()
