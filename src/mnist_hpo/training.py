"""Fit one configuration and track it in MLflow: the one training function that scripts/train.py
and every trial of scripts/tune.py run."""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar

from mnist_hpo.config import TrainConfig
from mnist_hpo.data import EVAL_BATCH_SIZE, SPLIT_SEED, MNISTDataModule
from mnist_hpo.model import LitClassifier
from mnist_hpo.tracking import EpochMetricsLogger, Tracker

# Lightning advertises its cloud services in the log of every run; the rest of its log stays.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda record: "💡 Tip" not in record.getMessage())

# A bar redraw costs about as much as a training step; every 20 steps it is still live.
PROGRESS_BAR_REFRESH_STEPS = 20


@dataclass(frozen=True)
class FitResult:
    run_id: str
    best_epoch: int  # 0-based, as MLflow's step
    val_loss: float  # at the best epoch (the lowest val_loss)
    val_acc: float  # at the best epoch
    epochs: int  # epochs trained
    seconds: float
    checkpoint_artifact: str  # the best epoch's weights, in the run's artifacts
    test_loss: float | None = None
    test_acc: float | None = None


class TrainingDiverged(RuntimeError):
    """The loss stopped being a number (too high a learning rate, typically)."""


class _StopOnDivergence(Callback):
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        val_loss = float(trainer.callback_metrics["val_loss"])
        if not math.isfinite(val_loss):
            lr = pl_module.hparams.lr
            raise TrainingDiverged(f"training diverged: val_loss is {val_loss} after epoch {trainer.current_epoch} (lr={lr:g})")


def fit(
    config: TrainConfig,
    tracker: Tracker,
    run_id: str,
    *,
    data_dir: str = "data",
    accelerator: str = "auto",
    callbacks: Sequence[Callback] = (),
    evaluate_test: bool = True,
    progress_bar: bool = True,
) -> FitResult:
    """Train ``config`` on MNIST, logging every setting, the per-epoch curves and the best
    checkpoint to the MLflow run ``run_id``; with ``evaluate_test``, also the test metrics of
    the best epoch's weights.

    The caller owns the run (see :meth:`Tracker.run`) and extra ``callbacks`` (tune's pruning).
    """
    started = time.perf_counter()
    pl.seed_everything(config.seed, verbose=False)
    data = MNISTDataModule(data_dir, batch_size=config.batch_size, val_size=config.val_size, seed=config.seed)
    data.prepare_data()
    tracker.log_params(
        run_id,
        {
            **dataclasses.asdict(config),
            "split_seed": SPLIT_SEED,
            "eval_batch_size": EVAL_BATCH_SIZE,
            "data_source": data.source,
            "accelerator": accelerator,
        },
    )
    logger = EpochMetricsLogger(tracker, run_id)
    with tempfile.TemporaryDirectory(prefix="mnist-hpo-") as checkpoint_dir:
        checkpoint = ModelCheckpoint(
            dirpath=checkpoint_dir, filename="best", monitor="val_loss", mode="min", save_weights_only=True
        )
        bar = [TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_STEPS)] if progress_bar else []
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_epochs=config.max_epochs,
            logger=logger,
            callbacks=[_StopOnDivergence(), *callbacks, checkpoint, *bar],
            enable_progress_bar=progress_bar,
            enable_model_summary=progress_bar,
            num_sanity_val_steps=0,  # validation runs after every epoch anyway
            log_every_n_steps=0,  # every curve is per epoch; no step-level logging work at all
        )
        model = LitClassifier(lr=config.lr, hidden_dim=config.hidden_dim)
        _interruptible(trainer.fit, model, datamodule=data)

        curves = {epoch: metrics for epoch, metrics in logger.history.items() if "val_loss" in metrics}
        best_epoch = min(curves, key=lambda epoch: curves[epoch]["val_loss"])
        best = curves[best_epoch]
        summary = {"best_val_loss": best["val_loss"], "best_val_acc": best["val_acc"], "best_epoch": best_epoch}
        test = {}
        if evaluate_test:
            best_weights = LitClassifier.load_from_checkpoint(checkpoint.best_model_path, map_location="cpu")
            test = evaluate_on_test(best_weights, data_dir, config.val_size, accelerator)
        tracker.log_metrics(run_id, {**summary, **test})
        tracker.client.log_artifact(run_id, checkpoint.best_model_path, artifact_path="checkpoints")
    return FitResult(
        run_id=run_id,
        best_epoch=best_epoch,
        val_loss=best["val_loss"],
        val_acc=best["val_acc"],
        epochs=len(curves),
        seconds=time.perf_counter() - started,
        checkpoint_artifact="checkpoints/best.ckpt",
        test_loss=test.get("test_loss"),
        test_acc=test.get("test_acc"),
    )


def evaluate_on_test(model: LitClassifier, data_dir: str, val_size: int, accelerator: str = "auto") -> dict[str, float]:
    """test_loss and test_acc of ``model`` on the 10,000 test images."""
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    _interruptible(trainer.test, model, datamodule=MNISTDataModule(data_dir, val_size=val_size), verbose=False)
    return {name: float(trainer.callback_metrics[name]) for name in ("test_loss", "test_acc")}


def _interruptible(trainer_fn, *args, **kwargs):
    """Run a Trainer entry point, turning Lightning's handling of Ctrl-C back into one.

    Lightning catches KeyboardInterrupt inside fit and test, ignores SIGINT from then on and
    calls sys.exit(1). Raising KeyboardInterrupt instead lets the callers close their MLflow
    run and Optuna trial as interrupted and print what finished; SIGINT stays ignored, so a
    second Ctrl-C cannot cut that clean-up short.
    """
    try:
        return trainer_fn(*args, **kwargs)
    except SystemExit as exit_:
        raise KeyboardInterrupt from exit_
