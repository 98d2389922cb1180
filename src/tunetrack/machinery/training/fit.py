"""Fit one configuration and track it in MLflow: TrackedRun gives the Lightning Trainer that
scripts/train.py and every trial of scripts/tune.py fit with, carrying what the machinery owns.

Lightning's MLFlowLogger is not used: its default is a ./mlruns file store that ``mlflow ui``
does not show, it logs epoch-level metrics against the global step, and it marks a run FAILED
on any exception, a pruned trial's included. The caller opens and closes the run (see
:meth:`Tracker.run`), and :class:`EpochMetricsLogger` hands Lightning's metrics over with
step = epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.loggers import Logger

from tunetrack.machinery.objectives import Objective, better
from tunetrack.machinery.runtime import devices, interrupts
from tunetrack.machinery.tracking.mlflow_runs import Tracker
from tunetrack.machinery.tracking.stores import ServerUnavailable
from tunetrack.machinery.tracking.system_metrics import Sampler
from tunetrack.machinery.training.phases import Phases
from tunetrack.machinery.training.resumption import KeptStateUnusable, check_kept
from tunetrack.machinery.training.several_per_step import NoProfiler, SeveralPerStep

# Lightning advertises its cloud services in the log of every run; the rest of its log stays.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda record: "💡 Tip" not in record.getMessage())
# Lightning 2.6 builds torch pytree specs in a way torch 2.14 deprecates, and says so once per
# process; nothing for a user of this repository to act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

# Where each run keeps its best epoch's weights (a Lightning checkpoint), among its artifacts.
CHECKPOINT_ARTIFACT = PurePosixPath("checkpoints/best.ckpt")

# latency_ms: the median of this many forward passes of one input, or of those that fit in this
# many seconds (a large network's), after a few that warm the caches up.
LATENCY_RUNS, LATENCY_SECONDS, LATENCY_WARMUP = 50, 0.2, 3

# A bar redraw costs about as much as a training step; every 20 steps it is still live.
PROGRESS_BAR_REFRESH_STEPS = 20


# What the machinery sets on every Trainer itself: an experiment's trainer() may not.
OWN_TRAINER_ARGUMENTS = ("accelerator", "devices", "strategy", "max_epochs", "logger", "enable_checkpointing",
                         "enable_progress_bar", "enable_model_summary", "profiler", "num_sanity_val_steps",
                         "log_every_n_steps")  # fmt: skip

# Where a run (and a trial) records the torch threads it trained with: a CPU's sums of floats
# come out the same only in the same order, which the number of threads changes.
THREADS = "threads"


@dataclass(frozen=True)
class FitResult:
    run_id: str
    model: pl.LightningModule  # with the best epoch's weights
    best_epoch: int  # 0-based, as MLflow's step (lines count epochs from 1)
    # At the best epoch: what the LightningModule logged of its validation (val_*), and params
    # and latency_ms (machinery.objectives).
    metrics: dict[str, float]
    objective: Objective  # what chose the best epoch, and what value() says
    seconds: float
    epochs: int  # trained: fewer than max_epochs when a callback stopped the run early
    max_epochs: int
    test: dict[str, float] = dataclasses.field(default_factory=dict)  # test_*, where the test split was used

    @property
    def value(self) -> float | tuple[float, ...]:
        """The objective's value at the best epoch: what a trial returns, and Optuna is told."""
        return self.objective.value(self.metrics)

    @property
    def stopped_early(self) -> str | None:
        """How the run stopped early, as the console and MLflow say it; None if it did not."""
        if self.epochs >= self.max_epochs:
            return None
        return f"stopped early after {self.epochs} of {self.max_epochs} epochs (best epoch {self.best_epoch + 1})"


class TrainingDiverged(RuntimeError):
    """The loss stopped being a number (too high a learning rate, typically)."""


class _CtrlC(Callback):
    """A Ctrl-C that a garbage collector's callback swallowed still stops training, a step
    later (see interrupts.check)."""

    def on_train_batch_end(self, *args) -> None:
        interrupts.check()

    def on_validation_batch_end(self, *args) -> None:
        interrupts.check()


class ObjectiveNotLogged(RuntimeError):
    """The metric that picks the best epoch is not among what the LightningModule logged."""


class _BestEpoch(Callback):
    """Keeps the best epoch by ``metric`` (better as ``direction`` says): its number, what the
    LightningModule logged of its validation, and a copy of its weights.

    In memory rather than ModelCheckpoint's file per improvement: Lightning calls every
    callback on every step, and ModelCheckpoint pays a repr() of its settings each time.
    A val_loss (or ``metric``) that is not a number ends the run with TrainingDiverged.
    """

    def __init__(self, metric: str, direction: str):
        self.metric, self.direction = metric, direction
        self.epoch, self.metrics, self.weights = -1, {}, None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = validation_metrics(trainer)
        if self.metric not in metrics:
            raise ObjectiveNotLogged(
                f"--objective {self.metric}: the LightningModule logged no {self.metric} in its validation epoch "
                f"(it logged {', '.join(metrics) or 'nothing'})"
            )
        for name in dict.fromkeys(["val_loss", self.metric]):
            if name in metrics and not math.isfinite(metrics[name]):
                raise TrainingDiverged(
                    f"after epoch {trainer.current_epoch + 1}: {name} is {metrics[name]}: training diverged"
                )
        if self.epoch < 0 or better(metrics[self.metric], self.metrics[self.metric], self.direction):
            self.epoch, self.metrics = trainer.current_epoch, metrics
            self.weights = {name: tensor.detach().clone() for name, tensor in pl_module.state_dict().items()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "metrics": self.metrics, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.metrics, self.weights = state["epoch"], state["metrics"], state["weights"]


def validation_metrics(trainer: pl.Trainer, split: str = "val") -> dict[str, float]:
    """What the LightningModule logged of its last ``split`` epoch (its ``val_*`` metrics), as numbers."""
    return {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith(f"{split}_")}


def size_and_latency(model: pl.LightningModule) -> dict[str, float]:
    """``params``, the network's parameter count, and ``latency_ms``, the median time its forward
    takes for one input (``example_input_array``) on the device it is on, in milliseconds:
    timed LATENCY_RUNS times, or for LATENCY_SECONDS if that comes first, after a warm-up."""
    params = sum(p.numel() for p in model.parameters())
    example = getattr(model, "example_input_array", None)
    if not isinstance(example, torch.Tensor):
        return {"params": float(params)}
    example = example[:1].to(model.device)
    synchronize = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    was_training, times = model.training, []
    model.eval()
    with torch.inference_mode():
        for _ in range(LATENCY_WARMUP):
            model(example)
        synchronize()
        deadline = time.perf_counter() + LATENCY_SECONDS
        while len(times) < LATENCY_RUNS and (len(times) < 3 or time.perf_counter() < deadline):
            started = time.perf_counter()
            model(example)
            synchronize()
            times.append(time.perf_counter() - started)
    model.train(was_training)
    return {"params": float(params), "latency_ms": 1000 * statistics.median(times)}


class EpochMetricsLogger(Logger):
    """Sends what the LightningModule logs to an MLflow run, with step = epoch, in one write per
    epoch.

    Lightning hands a logger an epoch's validation metrics, then its training metrics, each
    batch with the epoch added. They are kept until the next epoch's first batch, or the end of
    training however it ends (``finalize``: success, an exception, Ctrl-C), and then written in
    one log_batch call: one request per epoch to a tracking server, where each costs about as
    much CPU as a training step of a small trial. The machine's system metrics ride along, sampled
    then (tracking.system_metrics). The run's lifecycle is the caller's (see :meth:`Tracker.run`).
    """

    def __init__(self, tracker: Tracker, run_id: str, logged: set[tuple[str, int]] = frozenset(),
                 phases: Phases | None = None):  # fmt: skip
        super().__init__()
        self.tracker, self.run_id = tracker, run_id
        self.logged = logged  # (metric, epoch) already in the run: a run taken up again logs each once
        self.phases = phases or Phases()  # whose clock its writes run on
        self._epoch, self._metrics, self._system, self._sampled = None, {}, Sampler(), None
        self.trainer: pl.Trainer | None = None  # set once the Trainer exists

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run_id

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the caller logs every setting itself, once, before training starts

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = dict(metrics)
        # Lightning adds the epoch to what the module logs; a callback that writes to the
        # loggers itself (LearningRateMonitor, say) logs in the epoch under way.
        epoch = int(metrics.pop("epoch")) if "epoch" in metrics else self.trainer.current_epoch
        if epoch != self._epoch:
            self._flush()
            self._epoch = epoch
        self._metrics.update(metrics)

    def finalize(self, status: str) -> None:
        self._flush()

    def save(self) -> None:
        self._flush()

    def forget(self) -> None:
        """Write nothing more: the run is no longer this process's to write."""
        self._metrics, self.tracker = {}, None

    def _flush(self) -> None:
        metrics = {name: value for name, value in self._metrics.items() if (name, self._epoch) not in self.logged}
        if metrics and self.tracker is not None:
            if self._epoch != self._sampled:  # once an epoch (Lightning may save() more often)
                metrics.update(self._system.sample())
                self._sampled = self._epoch
            with self.phases.tracking():
                self.tracker.log_metrics(self.run_id, metrics, step=self._epoch)
        self._metrics = {}


def _no_arguments(settings) -> dict:
    return {}


@dataclass
class TrackedRun:
    """One MLflow run's training. ``trainer(settings)`` is the Lightning Trainer to fit: it
    carries the experiment's own arguments (``arguments``, its trainer(settings): callbacks,
    gradient clipping, ...) and what the machinery owns: the accelerator, the epochs, MLflow's
    logger (step = epoch), the best epoch's weights, several minibatches per Lightning step
    (several_per_step.SeveralPerStep), where the time goes (phases.Phases), and the caller's
    ``callbacks`` (a trial's pruning and kept state). ``resume_from``, a checkpoint of
    training.resumption's, is where the fit goes on from, in the same run, which already holds
    the settings and the curves up to there. After ``trainer.fit``: ``result``, and ``value``,
    the objective's value at the best epoch.

    The caller owns the run (see :meth:`Tracker.run`).
    """

    tracker: Tracker
    run_id: str
    options: Any  # where to train, how many minibatches a Lightning step carries, the objective
    arguments: Callable[[Any], Mapping[str, Any]] = _no_arguments
    callbacks: Sequence[Callback] = ()
    progress_bar: bool = True
    resume_from: str | None = None
    result: FitResult | None = dataclasses.field(default=None, init=False)

    def trainer(self, settings) -> pl.Trainer:
        arguments = dict(self.arguments(settings))
        if owned := [name for name in OWN_TRAINER_ARGUMENTS if name in arguments]:
            raise ValueError(f"the experiment's trainer() sets {', '.join(owned)}, which the machinery sets itself")
        own_callbacks = list(arguments.pop("callbacks", None) or [])
        phases = Phases()
        logged = self.tracker.logged_steps(self.run_id) if self.resume_from else frozenset()
        logger = EpochMetricsLogger(self.tracker, self.run_id, logged, phases)
        best = _BestEpoch(*self.options.goal.per_epoch)
        trainer = pl.Trainer(
            accelerator=self.options.accelerator,
            devices=1,
            max_epochs=settings.max_epochs,
            logger=logger,
            callbacks=[
                SeveralPerStep(self.options.minibatches_per_step),
                best,
                _CtrlC(),
                phases,
                *own_callbacks,
                *self.callbacks,
                _Tracked(self, settings, best, phases),  # last: what the others did is done
                *([TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_STEPS)] if self.progress_bar else []),
            ],
            enable_progress_bar=self.progress_bar,
            enable_model_summary=self.progress_bar,
            enable_checkpointing=False,  # _BestEpoch keeps the weights worth keeping
            profiler=NoProfiler(),
            num_sanity_val_steps=0,  # validation runs after every epoch anyway
            log_every_n_steps=0,  # every curve is per epoch: no step-level logging work at all
            **arguments,
        )
        logger.trainer = trainer
        trainer.ckpt_path = self.resume_from  # Lightning's own way: its fit goes on from there
        return trainer

    @property
    def value(self) -> float | tuple[float, ...]:
        """The objective's value at the best epoch: what a trial returns, and Optuna is told."""
        if self.result is None:
            raise RuntimeError("a run's value is known once its trainer.fit(...) has ended")
        return self.result.value

    def test(self, model: pl.LightningModule, data: pl.LightningDataModule) -> dict[str, float]:
        """Evaluate ``model`` (its best epoch's weights, after the fit) on ``data``'s test split,
        once, and log what it scored (``test_loss``, ``test_acc``, ...) and the split to the run."""
        test = evaluate(model, data, self.options.accelerator, "test")
        self.tracker.log_datasets(self.run_id, [split for split in data.describe() if split.context == "test"])
        self.tracker.log_metrics(self.run_id, test)
        self.result = dataclasses.replace(self.result, test=test)
        return test


class _Tracked(Callback):
    """The machinery's part of a fit, at its start and end: the settings and the data logged
    (once: not by a fit that goes on from a kept state, which checks that state first); at its
    end, the model given its best epoch's weights, that epoch's metrics, the network's size and
    latency and the weights logged, and the TrackedRun's result set; and where the time went,
    however the fit ended, unless it was stopped, the store is gone, or the run is another
    process's now (EpochMetricsLogger.forget)."""

    def __init__(self, run: TrackedRun, settings, best: _BestEpoch, phases: Phases):
        self.run, self.settings, self.best, self.phases = run, settings, best, phases
        self.started = time.perf_counter()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        run, data = self.run, trainer.datamodule
        if run.resume_from is not None:
            check_kept(pl_module, run.resume_from)  # before Lightning's restore would fail on it
            return
        with self.phases.tracking():
            if data is not None and hasattr(data, "describe"):
                run.tracker.log_datasets(run.run_id, [split for split in data.describe() if split.context != "test"])
            run.tracker.log_params(
                run.run_id,
                {
                    **dataclasses.asdict(self.settings),
                    "data_source": getattr(data, "source", None),
                    "accelerator": run.options.accelerator,
                    "minibatches_per_step": run.options.minibatches_per_step,
                    # The order of a CPU's sums: train.py --from-run trains with as many threads.
                    THREADS: torch.get_num_threads(),
                    **devices.params(),  # which GPU, in a tune worker given one
                },
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run, best = self.run, self.best
        for logger in trainer.loggers:
            logger.save()  # the last epoch's curves, before the summary and the time
        pl_module.load_state_dict(best.weights)
        epochs = trainer.current_epoch  # the epochs completed
        metrics = {**best.metrics, **size_and_latency(pl_module)}
        summary = {"best_epoch": best.epoch, "epochs": epochs, **{f"best_{k}": v for k, v in best.metrics.items()}}
        with self.phases.tracking(), tempfile.TemporaryDirectory(prefix="checkpoint-") as tmp:
            more = {k: v for k, v in metrics.items() if k not in best.metrics}
            run.tracker.log_metrics(run.run_id, {**summary, **more})
            path = Path(tmp) / CHECKPOINT_ARTIFACT.name
            trainer.save_checkpoint(path, weights_only=True)
            run.tracker.log_artifact(run.run_id, path, str(CHECKPOINT_ARTIFACT.parent))
        run.result = FitResult(
            run_id=run.run_id,
            model=pl_module,
            best_epoch=best.epoch,
            metrics=metrics,
            objective=run.options.goal,
            seconds=time.perf_counter() - self.started,
            epochs=epochs,
            max_epochs=self.settings.max_epochs,
        )
        if run.result.stopped_early:
            run.tracker.set_tags(run.run_id, {"stopped_early": run.result.stopped_early})
        self._log_time(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SystemExit, ServerUnavailable, KeptStateUnusable)):
            with contextlib.suppress(Exception):
                self._log_time(trainer)

    def _log_time(self, trainer: pl.Trainer) -> None:
        if any(getattr(logger, "tracker", True) is None for logger in trainer.loggers):
            return  # the run is another process's now
        phases = self.phases.metrics()
        self.run.tracker.log_metrics(self.run.run_id, {**phases, "time_fit_s": round(sum(phases.values()), 3)})


def fit(model: pl.LightningModule, data: pl.LightningDataModule, settings, run: TrackedRun,
        test: bool = True) -> FitResult:  # fmt: skip
    """``run.trainer(settings).fit(model, datamodule=data)``, and, with ``test``, the test split
    evaluated with the best epoch's weights: train.py's run, a study's repeats, and the tests'."""
    trainer = run.trainer(settings)
    with lightnings_exit_as_interrupt():
        trainer.fit(model, datamodule=data)
    if test:
        run.test(model, data)
    return run.result


def evaluate(model: pl.LightningModule, data: pl.LightningDataModule, accelerator: str, split: str) -> dict[str, float]:
    """What the LightningModule logs of ``model`` on ``data``'s "test" or "val" split
    (``test_loss``, ``test_acc``, ...)."""
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    run = trainer.test if split == "test" else trainer.validate
    with lightnings_exit_as_interrupt():
        run(model, datamodule=data, verbose=False)
    return validation_metrics(trainer, split)


def load_weights(model: pl.LightningModule, checkpoint: str) -> pl.LightningModule:
    """``model`` with the weights of a checkpoint that fit() logged."""
    import torch

    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    return model


@contextlib.contextmanager
def lightnings_exit_as_interrupt() -> Iterator[None]:
    """Around a Trainer's fit or test (or an objective that calls one): Lightning's handling of
    Ctrl-C turned back into one.

    Lightning catches KeyboardInterrupt inside fit and test and calls sys.exit(1), and ends a
    fit after a SIGTERM with a SystemExit of its own. Raising KeyboardInterrupt instead lets the
    callers close their MLflow run and Optuna trial as stopped and print what finished; the
    handler of machinery.runtime.interrupts ignores any further request, so a second Ctrl-C cannot cut
    that clean-up short.
    """
    try:
        yield
    except SystemExit as exit_:
        if not (interrupts.requested() or isinstance(exit_.__context__, KeyboardInterrupt)):
            raise  # someone's own sys.exit
        raise KeyboardInterrupt from exit_
