"""How much an epoch costs: the project's training path against the original pipeline and
against a plain PyTorch loop, on the real MNIST, in one process (see scripts/benchmark.py).

- (a) ``project``: :func:`machinery.training.fit.fit` exactly as a tune trial runs it: the
  experiment's LitClassifier and MNISTDataModule, Lightning with training.several_per_step.SeveralPerStep, MLflow
  logging to a throwaway store, the best epoch kept, no progress bar;
- (b) ``original``: the original pipeline, as a user would write it from its description:
  torchvision's MNIST with a per-image ToTensor + Normalize transform through DataLoaders, its
  LitClassifier (self.log on every step), Lightning's defaults and its MLFlowLogger;
- (c) ``plain``: the same training as a plain PyTorch loop (:func:`train_plainly`): forward,
  loss, backward and a fused AdamW step over the same in-memory batches, and the same
  validation pass: the floor for this model in PyTorch.

The machine's speed drifts by a factor of 1.7 within minutes, so (a) and (c) run in lockstep:
an epoch of (c) between every two of (a), each of (c)'s epochs paired with both its
neighbours, and the median of those pairs' ratios is the figure. All run on the same device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from tunetrack.experiment.data import MNISTDataModule
from tunetrack.experiment.search import EXPERIMENT, build
from tunetrack.experiment.settings import Settings
from tunetrack.machinery.options import Options, TuneOptions
from tunetrack.machinery.tracking.mlflow_runs import connect
from tunetrack.machinery.training.fit import TrackedRun, fit
from tunetrack.machinery.training.resumption import KeepEachEpoch


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


class OriginalClassifier(pl.LightningModule):
    """The original pipeline's LightningModule, as it was written."""

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


def time_original(settings: Settings, device: str) -> list[float]:
    from pytorch_lightning.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, random_split
    from torchvision import datasets, transforms

    mean, std = MNISTDataModule.mean, MNISTDataModule.std
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    full = datasets.MNIST(settings.data_dir, train=True, download=False, transform=transform)
    held_out = MNISTDataModule(settings).held_out
    sizes = [len(full) - held_out, held_out]
    train, val = random_split(full, sizes, generator=torch.Generator().manual_seed(0))
    clock = _EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator=device,
            devices=1,
            max_epochs=settings.max_epochs,
            callbacks=[clock],
            default_root_dir=tmp,
            logger=MLFlowLogger(experiment_name="benchmark", tracking_uri=f"sqlite:///{tmp}/mlflow.db"),
        )
        # Its progress bar draws as it would in a terminal, into a buffer instead.
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(
                OriginalClassifier(hidden_dim=settings.hidden_dim),
                DataLoader(train, batch_size=settings.batch_size, shuffle=True),
                DataLoader(val, batch_size=settings.batch_size),
            )
    return clock.epochs()


class PlainLoop:
    """The project's training written as a plain PyTorch loop: the experiment's network with the
    same initial weights (built alike), the same minibatches in the same order, AdamW fused with
    the same cosine schedule, and the same per-epoch curves. Tests hold fit() to it; the
    benchmark times its epochs as the floor for this model."""

    def __init__(self, settings: Settings, device: str = "cpu"):
        model, data = build(settings)
        self.net, hparams = model.net.to(device), model.hparams
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=hparams.lr, weight_decay=hparams.weight_decay, fused=True
        )
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=settings.max_epochs)
        data.prepare_data()
        data.device = torch.device(device, 0) if device == "cuda" else torch.device(device)  # as Lightning names it
        data.setup("fit")
        self.train, self.val = data.train_dataloader(), data.val_dataloader()
        self.sizes = {split: len(data.splits[split][1]) for split in ("train", "val")}
        self.device = device
        self.curves: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_acc": []}

    def epoch(self) -> float:
        """Train and validate one epoch; return its seconds, the validation loss read."""
        started = time.perf_counter()
        self.net.train()
        loss_sum = torch.zeros((), device=self.device)
        for x, y in self.train:
            loss = F.cross_entropy(self.net(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss_sum.add_(loss.detach(), alpha=len(y))
        self.schedule.step()
        self.net.eval()
        with torch.no_grad():
            scores = [(self.net(x), y) for x, y in self.val]
            val_loss = sum(F.cross_entropy(s, y) * len(y) for s, y in scores) / self.sizes["val"]
            val_acc = sum((s.argmax(dim=1) == y).sum() for s, y in scores) / self.sizes["val"]
        self.curves["val_loss"].append(val_loss.item())  # reading it waits for the device
        seconds = time.perf_counter() - started
        self.curves["train_loss"].append((loss_sum / self.sizes["train"]).item())
        self.curves["val_acc"].append(val_acc.item())
        return seconds


def train_plainly(settings: Settings, device: str = "cpu") -> dict[str, list[float]]:
    """The per-epoch curves of ``settings`` trained by :class:`PlainLoop`."""
    loop = PlainLoop(settings, device)
    for _ in range(settings.max_epochs):
        loop.epoch()
    return loop.curves


class _Lockstep(pl.Callback):
    """Runs a plain loop's epoch between every two of the project's, timing each apart: the
    project's epoch k lasts from its start to the start of epoch k + 1 (validation and
    logging included), less the plain epoch run in between."""

    def __init__(self, plain: PlainLoop):
        self.plain, self.project_epochs, self.plain_epochs = plain, [], []
        self._started = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._started is not None:
            self.project_epochs.append(time.perf_counter() - self._started)
            self.plain_epochs.append(self.plain.epoch())
        self._started = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.project_epochs.append(time.perf_counter() - self._started)


def lockstep(settings: Settings, device: str, minibatches_per_step: int, warmup: int = 1) -> dict:
    """(a) and (c) in lockstep: project, plain, project, plain, ... one epoch each, over
    ``warmup + settings.max_epochs`` epochs of the project's. Each epoch of one is paired with
    each neighbour of the other, in either order; the median of those pairs' ratios (a over c)
    is the figure, and a burst of load on the machine spoils one or two pairs, not the median."""
    timed = dataclasses.replace(settings, max_epochs=warmup + settings.max_epochs)
    clock = _Lockstep(PlainLoop(timed, device))
    options = Options(accelerator=device, minibatches_per_step=minibatches_per_step)
    with tempfile.TemporaryDirectory() as tmp:
        tracker = connect(f"sqlite:///{tmp}/mlflow.db", "benchmark")
        with tracker.run("project") as run_id, contextlib.redirect_stdout(io.StringIO()):
            model, data = build(timed)
            run = TrackedRun(tracker, run_id, options, callbacks=[clock], progress_bar=False)
            fit(model, data, timed, run, test=False)
    project, plain = clock.project_epochs[warmup:], clock.plain_epochs[warmup:]
    # The plain epoch i ran between the project's epochs i and i + 1 (of those timed).
    ratios = [a / c for i, c in enumerate(plain) for a in project[i : i + 2]]
    return {"project": project, "plain": plain, "ratios": ratios, "ratio": statistics.median(ratios)}


class _TimedKeeping(KeepEachEpoch):
    """machinery.training.resumption's callback, timing its own work: the save at an epoch's end, and the
    upload and naming at the next one's start."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seconds: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        started = time.perf_counter()
        super().on_train_epoch_end(trainer, pl_module)
        self.seconds.append(time.perf_counter() - started)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        started = time.perf_counter()
        super().on_train_epoch_start(trainer, pl_module)
        if self.seconds:
            self.seconds[-1] += time.perf_counter() - started


def time_keeping(settings: Settings, device: str, minibatches_per_step: int, warmup: int = 1) -> dict:
    """What keeping each epoch's state costs a trial: the seconds machinery.training.resumption spends an
    epoch (a Lightning checkpoint written, uploaded to the run's artifacts, named on an Optuna
    trial after a look at it, all on SQLite files), against the epoch's own, in the same run."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    timed = dataclasses.replace(settings, max_epochs=warmup + settings.max_epochs)
    options = Options(accelerator=device, minibatches_per_step=minibatches_per_step)
    with tempfile.TemporaryDirectory() as tmp:
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}/optuna.db")
        trial = optuna.create_study(storage=storage).ask()
        tracker = connect(f"sqlite:///{tmp}/mlflow.db", "benchmark")
        with tracker.run("keeping") as run_id, contextlib.redirect_stdout(io.StringIO()):
            keeping = _TimedKeeping(tracker, run_id, lambda epoch, artifact: trial.set_user_attr("kept", artifact),
                                    lambda: storage.get_trial(trial._trial_id))  # fmt: skip
            clock = _EpochClock()
            model, data = build(timed)
            run = TrackedRun(tracker, run_id, options, callbacks=[clock, keeping], progress_bar=False)
            fit(model, data, timed, run, test=False)
    epochs, kept = clock.epochs()[warmup:], keeping.seconds[warmup:-1]  # the last epoch's state is never published
    return {"epoch_s": statistics.median(epochs), "keeping_s": statistics.median(kept),
            "share": statistics.median(kept) / statistics.median(epochs)}  # fmt: skip


def time_startup(settings: Settings, rounds: int) -> dict[str, float]:
    """What a new process pays before its first step, piece by piece (and at its exit): the
    median of ``rounds`` processes for each way of starting."""
    import subprocess
    import sys

    from tunetrack.machinery.data import files

    imports = "import tunetrack.experiment.search, tunetrack.machinery.training.fit, tunetrack.machinery.study.workers"
    commands = {  # a process that imports it all and exits: as Python leaves its collector, and as the scripts do
        "python + imports + exit (torch, Lightning, MLflow, Optuna)": imports,
        "the same, collector paused and imports frozen": (
            "from tunetrack.machinery.runtime import collector; collector.pause(); "
            f"{imports}; collector.freeze_imports()"
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(rounds):  # alternated, as the machine's speed drifts
        for name, command in list(commands.items())[:: 1 if round_ % 2 == 0 else -1]:
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", command], check=True)
            seconds[name].append(time.perf_counter() - started)
    timings = {name: statistics.median(values) for name, values in seconds.items()}
    _, data = build(settings)
    files._verified.clear()
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        data.prepare_data()
    timings["MD5 check of the files"] = time.perf_counter() - started
    from tunetrack.machinery.data import in_memory

    in_memory._split_cache.clear()
    started = time.perf_counter()
    data.setup("fit")
    timings["parse and split the data set"] = time.perf_counter() - started
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
    from workbench.servers import cpu_seconds, mlflow_server, postgres, scratch_folder

    folder = scratch_folder("tunetrack-benchmark-")
    try:
        with postgres(folder / "postgres") as database, mlflow_server(database.url("mlflow"), folder / "mlflow") as ml:
            postmaster = database.pid
            yield database.url("optuna"), ml.url, lambda: cpu_seconds(postmaster) + cpu_seconds(ml.process.pid)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _study_cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended: the tune session's."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_study(settings: Settings, workers: int, trials: int, stores: str = "sqlite") -> dict[str, float]:
    """A whole tune session on throwaway stores (see study_stores): its wall time (worker
    start-up included); its throughput once the workers run (from the first trial's start to
    the last one's end); and the CPU time it took, in its own processes and in the stores'.
    The machine's load moves the first two by 10% and more from run to run; CPU time, far less."""
    from tunetrack.machinery.study.tuning import tune

    with study_stores(stores) as (storage, tracking_uri, stores_cpu):
        tracker = connect(tracking_uri, "benchmark")
        options = TuneOptions(
            n_trials=trials, workers=workers, storage=storage, pruning=False, repeats=0, baseline="none"
        ).resolved(settings)
        options = dataclasses.replace(options, study_name="benchmark", registered_model="")
        started, cpu_before, stores_before = time.perf_counter(), _study_cpu_seconds(), stores_cpu()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            outcome = tune(EXPERIMENT, settings, options, lambda: tracker)
        seconds = time.perf_counter() - started
        study_cpu, server_cpu = _study_cpu_seconds() - cpu_before, stores_cpu() - stores_before
        done = outcome.study.trials  # while the stores still run
        logged = tracker.client.get_run(outcome.parent_run_id).data.metrics
    split = {name.removeprefix("time_").removesuffix("_s"): value for name, value in logged.items()
             if name.startswith("time_")}  # fmt: skip
    running = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {
        "workers": workers,
        "stores": stores,
        "seconds": seconds,
        "trials_per_minute": 60 * trials / seconds,
        "steady_trials_per_minute": 60 * trials / running,
        "study_cpu_seconds": study_cpu,
        "stores_cpu_seconds": server_cpu,
        "split": split,  # where its time went, as its parent run records it (study/time_split.py)
    }
