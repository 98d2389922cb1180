"""How much an epoch costs: the project's training path against the write-up's pipeline and
against a plain PyTorch loop, on the real MNIST, in one process (see scripts/benchmark.py).

- (a) ``project``: :func:`mnist_hpo.training.fit` exactly as a tune trial runs it (Lightning,
  MLflow logging to a throwaway store, checkpointing, no progress bar);
- (b) ``write-up``: the write-up's pipeline, as a user would write it from its text:
  torchvision's MNIST with a per-image ToTensor + Normalize transform through DataLoaders,
  its LitClassifier (self.log on every step), Lightning's defaults and its MLFlowLogger;
- (c) ``plain``: forward, loss, backward and a fused AdamW step over in-memory tensors, and the
  same validation pass: the floor for this model in PyTorch.

An epoch is one pass over the training images plus validation on the held-out ones (55,000 and
5,000 by TrainConfig's defaults).
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch import nn

from mnist_hpo.config import TrainConfig
from mnist_hpo.data import EVAL_BATCH_SIZE, MNIST_MEAN, MNIST_STD, InMemoryBatches, ensure_mnist_once, load_splits
from mnist_hpo.tracking import connect
from mnist_hpo.training import fit

HIDDEN_DIM = 128
VAL_SIZE = TrainConfig.val_size
TRAIN_SIZE = 60_000 - VAL_SIZE
PATHS = ("project", "write-up", "plain")


@dataclass(frozen=True)
class EpochTiming:
    path: str
    batch_size: int
    seconds: float  # median over the timed epochs
    samples_per_second: float
    epochs: list[float]


class _EpochClock(pl.Callback):
    """Wall time from one epoch's start to the next: training, validation and logging."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())

    def epochs(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


def time_project(data_dir: str, batch_size: int, epochs: int) -> list[float]:
    clock = _EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        tracker = connect(f"sqlite:///{tmp}/mlflow.db", "benchmark")
        with tracker.run(f"project batch {batch_size}") as run_id, contextlib.redirect_stdout(io.StringIO()):
            config = TrainConfig(hidden_dim=HIDDEN_DIM, batch_size=batch_size, max_epochs=epochs)
            fit(config, tracker, run_id, data_dir=data_dir, callbacks=[clock], evaluate_test=False, progress_bar=False)
    return clock.epochs()


class WriteUpClassifier(pl.LightningModule):
    """The write-up's LightningModule, as printed there."""

    def __init__(self, lr=1e-3, hidden_dim=128):
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 10))
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.model(x)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", acc, prog_bar=True)
        return loss


def time_write_up(data_dir: str, batch_size: int, epochs: int) -> list[float]:
    from pytorch_lightning.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, random_split
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    full = datasets.MNIST(data_dir, train=True, download=False, transform=transform)
    train, val = random_split(full, [len(full) - VAL_SIZE, VAL_SIZE], generator=torch.Generator().manual_seed(0))
    clock = _EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_epochs=epochs,
            callbacks=[clock],
            default_root_dir=tmp,
            logger=MLFlowLogger(experiment_name="benchmark", tracking_uri=f"sqlite:///{tmp}/mlflow.db"),
        )
        # Its progress bar draws as it would in a terminal, into a buffer instead.
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(
                WriteUpClassifier(hidden_dim=HIDDEN_DIM),
                DataLoader(train, batch_size=batch_size, shuffle=True),
                DataLoader(val, batch_size=batch_size),
            )
    return clock.epochs()


def time_plain(data_dir: str, batch_size: int, epochs: int) -> list[float]:
    splits = load_splits(data_dir, VAL_SIZE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, HIDDEN_DIM), nn.ReLU(), nn.Linear(HIDDEN_DIM, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    loss_fn = nn.CrossEntropyLoss()
    train = InMemoryBatches(splits.train_images, splits.train_labels, batch_size, torch.Generator().manual_seed(0))
    val = InMemoryBatches(splits.val_images, splits.val_labels, EVAL_BATCH_SIZE)
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        for x, y in train:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = sum(loss_fn(model(x), y) * len(y) for x, y in val) / len(splits.val_labels)
        val_loss.item()
        times.append(time.perf_counter() - started)
    return times


TIMERS = {"project": time_project, "write-up": time_write_up, "plain": time_plain}


def time_epochs(path: str, data_dir: str, batch_size: int, epochs: int, warmup: int = 1) -> EpochTiming:
    """Median seconds per epoch of ``path`` over ``epochs`` epochs after ``warmup`` more."""
    ensure_mnist_once(data_dir)
    timed = TIMERS[path](data_dir, batch_size, warmup + epochs)[warmup:]
    median = statistics.median(timed)
    return EpochTiming(path, batch_size, median, TRAIN_SIZE / median, timed)


def time_startup(data_dir: str) -> dict[str, float]:
    """What a new process pays before its first step, piece by piece."""
    import subprocess
    import sys

    from mnist_hpo.mnist_files import ensure_mnist

    timings = {}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mnist_hpo.training, mnist_hpo.workers"], check=True)
    timings["python + imports (torch, Lightning, MLflow, Optuna)"] = time.perf_counter() - started
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ensure_mnist(data_dir)
    timings["MD5 check of the four files"] = time.perf_counter() - started
    load_splits.cache_clear()
    started = time.perf_counter()
    load_splits(data_dir, VAL_SIZE)
    timings["parse, normalize and split MNIST"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        connect(f"sqlite:///{tmp}/mlflow.db", "benchmark")
        started = time.perf_counter()
        connect(f"sqlite:///{tmp}/mlflow.db", "benchmark")
        timings["open an existing MLflow store"] = time.perf_counter() - started
    return timings


def time_study(data_dir: str, workers: int, trials: int, epochs: int) -> dict[str, float]:
    """A whole tune session on throwaway stores: its wall time (worker start-up included), and
    its throughput once the workers run (from the first trial's start to the last one's end)."""
    from mnist_hpo.tuning import tune

    with tempfile.TemporaryDirectory() as tmp:
        tracker = connect(f"sqlite:///{tmp}/mlflow.db", "benchmark")
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            session = tune(
                tracker,
                f"sqlite:///{tmp}/optuna.db",
                "benchmark",
                trials,
                workers,
                base=TrainConfig(max_epochs=epochs),
                data_dir=data_dir,
                pruning=False,
            )
        seconds = time.perf_counter() - started
    done = session.study.trials
    running = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {
        "workers": workers,
        "seconds": seconds,
        "trials_per_minute": 60 * trials / seconds,
        "steady_trials_per_minute": 60 * trials / running,
    }
