"""How much an epoch costs: the project's training path against the write-up's pipeline and
against a plain PyTorch loop, on the real MNIST, in one process (see scripts/benchmark.py).

- (a) ``project``: :func:`mnist_hpo.training.fit` exactly as a tune trial runs it (Lightning,
  MLflow logging to a throwaway store, checkpointing, no progress bar);
- (b) ``write-up``: the write-up's pipeline, as a user would write it from its text:
  torchvision's MNIST with a per-image ToTensor + Normalize transform through DataLoaders,
  its LitClassifier (self.log on every step), Lightning's defaults and its MLFlowLogger;
- (c) ``plain``: the same training as a plain PyTorch loop (:func:`train_plainly`): forward,
  loss, backward and a fused AdamW step over in-memory tensors, and the same validation pass:
  the floor for this model in PyTorch.

All three run on the same device, the CPU unless told otherwise.

An epoch is one pass over the training images plus validation on the held-out ones (55,000 and
5,000 by TrainConfig's defaults).
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch import nn

from mnist_hpo.config import TrainConfig
from mnist_hpo.data import EVAL_BATCH_SIZE, MNIST_MEAN, MNIST_STD, InMemoryBatches, ensure_mnist_once, load_splits
from mnist_hpo.model import LitClassifier
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


def time_project(data_dir: str, batch_size: int, epochs: int, device: str) -> list[float]:
    clock = _EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        tracker = connect(f"sqlite:///{tmp}/mlflow.db", "benchmark")
        with tracker.run(f"project batch {batch_size}") as run_id, contextlib.redirect_stdout(io.StringIO()):
            config = TrainConfig(hidden_dim=HIDDEN_DIM, batch_size=batch_size, max_epochs=epochs)
            fit(config, tracker, run_id, data_dir=data_dir, accelerator=device, callbacks=[clock],
                evaluate_test=False, progress_bar=False)  # fmt: skip
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


def time_write_up(data_dir: str, batch_size: int, epochs: int, device: str) -> list[float]:
    from pytorch_lightning.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, random_split
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    full = datasets.MNIST(data_dir, train=True, download=False, transform=transform)
    train, val = random_split(full, [len(full) - VAL_SIZE, VAL_SIZE], generator=torch.Generator().manual_seed(0))
    clock = _EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator=device,
            devices=1,
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


def train_plainly(
    config: TrainConfig, data_dir: str, device: str = "cpu", epoch_done: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """The project's training written as a plain PyTorch loop: the same initial weights (seeded
    alike), the same minibatches in the same order, AdamW fused with the same cosine schedule,
    and the same per-epoch curves, which it returns. A test holds fit() to it; the benchmark
    times it as the floor for this model. ``epoch_done`` is called after each epoch's
    validation, its loss read."""
    pl.seed_everything(config.seed, verbose=False)
    model = LitClassifier.from_config(config).model.to(device)  # drawn as fit() draws it
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.max_epochs)
    loss_fn = nn.CrossEntropyLoss()
    splits = load_splits(data_dir, config.val_size, device)
    shuffle = torch.Generator(device=device).manual_seed(config.seed)
    train = InMemoryBatches(splits.train_images, splits.train_labels, config.batch_size, shuffle)
    val = InMemoryBatches(splits.val_images, splits.val_labels, EVAL_BATCH_SIZE)
    curves: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_acc": []}
    for _ in range(config.max_epochs):
        model.train()
        loss_sum = torch.zeros((), device=device)
        for x, y in train:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum.add_(loss.detach(), alpha=len(y))
        schedule.step()
        model.eval()
        with torch.no_grad():
            scores = [(model(x), y) for x, y in val]
            val_loss = sum(loss_fn(s, y) * len(y) for s, y in scores) / len(splits.val_labels)
            val_acc = sum((s.argmax(dim=1) == y).sum() for s, y in scores) / len(splits.val_labels)
        curves["val_loss"].append(val_loss.item())  # reading it waits for the device
        epoch_done()
        curves["train_loss"].append((loss_sum / len(splits.train_labels)).item())
        curves["val_acc"].append(val_acc.item())
    return curves


def time_plain(data_dir: str, batch_size: int, epochs: int, device: str) -> list[float]:
    ends = [time.perf_counter()]
    config = TrainConfig(hidden_dim=HIDDEN_DIM, batch_size=batch_size, max_epochs=epochs)
    train_plainly(config, data_dir, device, epoch_done=lambda: ends.append(time.perf_counter()))
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


TIMERS = {"project": time_project, "write-up": time_write_up, "plain": time_plain}


def time_epochs(
    path: str, data_dir: str, batch_size: int, epochs: int, device: str = "cpu", warmup: int = 1
) -> EpochTiming:
    """Median seconds per epoch of ``path`` on ``device`` over ``epochs`` epochs after ``warmup`` more."""
    ensure_mnist_once(data_dir)
    timed = TIMERS[path](data_dir, batch_size, warmup + epochs, device)[warmup:]
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


@contextlib.contextmanager
def study_stores(kind: str) -> Iterator[tuple[str, str, Callable[[], float]]]:
    """Throwaway stores for a study, as (Optuna storage URL, MLflow tracking URI, the CPU
    seconds the stores' own processes have used so far): two SQLite files (``"sqlite"``, one
    machine's default, no process of their own), or a PostgreSQL cluster and an mlflow server on
    it (``"servers"``, what many machines share)."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/optuna.db", f"sqlite:///{tmp}/mlflow.db", lambda: 0.0
        return
    from mnist_hpo.devtools.servers import mlflow_server, postgres, scratch_folder

    folder = scratch_folder("mnist-hpo-benchmark-")
    try:
        with postgres(folder / "postgres") as database, mlflow_server(database.url("mlflow"), folder / "mlflow") as ml:
            postmaster = int((database.folder / "data" / "postmaster.pid").read_text().split()[0])

            def cpu() -> float:
                return _cpu_seconds([postmaster, *_pids(f"-P {postmaster}"), *_pids(f"-g {ml.process.pid}")])

            yield database.url("optuna"), ml.url, cpu
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _pids(pgrep: str) -> list[int]:
    return [int(pid) for pid in os.popen(f"pgrep {pgrep}").read().split()]


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time of these processes and of their children that have ended (PostgreSQL runs a
    process per connection)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def _study_cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended: the tune session's."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_study(data_dir: str, workers: int, trials: int, epochs: int, stores: str = "sqlite") -> dict[str, float]:
    """A whole tune session on throwaway stores (see study_stores): its wall time (worker
    start-up included); its throughput once the workers run (from the first trial's start to
    the last one's end); and the CPU time it took, in its own processes and in the stores'.
    The machine's load moves the first two by 10% and more from run to run; CPU time, far less."""
    from mnist_hpo.tuning import tune

    with study_stores(stores) as (storage, tracking_uri, stores_cpu):
        tracker = connect(tracking_uri, "benchmark")
        started, cpu_before, stores_before = time.perf_counter(), _study_cpu_seconds(), stores_cpu()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            session = tune(
                tracker,
                storage,
                "benchmark",
                trials,
                workers,
                base=TrainConfig(max_epochs=epochs),
                data_dir=data_dir,
                pruning=False,
                registered_model=None,
            )
        seconds = time.perf_counter() - started
        study_cpu, server_cpu = _study_cpu_seconds() - cpu_before, stores_cpu() - stores_before
        done = session.study.trials  # while the stores still run
    running = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {
        "workers": workers,
        "stores": stores,
        "seconds": seconds,
        "trials_per_minute": 60 * trials / seconds,
        "steady_trials_per_minute": 60 * trials / running,
        "study_cpu_seconds": study_cpu,
        "stores_cpu_seconds": server_cpu,
    }
