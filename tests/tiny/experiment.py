"""The tiny experiment: two data sets of 16x16 grey pictures of four classes (a block pattern
each, at a random brightness, under noise), kept on disk in LeCun's format with their MD5s and
"fetched" by writing them; two networks, one of them with a hyperparameter of its own; a
LightningModule of Lightning's shape; a search space; an objective; the Trainer's arguments.
A network learns it in an epoch or two, but not perfectly: trials differ."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from pytorch_lightning.callbacks import EarlyStopping
from torch import nn
from torch.nn import functional as F

from tiny.settings import TinySettings
from tunetrack.machinery.contract import Experiment, SettingError
from tunetrack.machinery.data.files import FolderUnusable, Source, ensure_files
from tunetrack.machinery.data.idx import idx_bytes, read_idx
from tunetrack.machinery.data.in_memory import InMemoryImages, digest
from tunetrack.machinery.data.pictures import to_array
from tunetrack.machinery.study.space import suggest

SIDE, CLASSES = 16, ("north", "east", "south", "west")
TRAIN, TEST = 500, 120
PATTERNS = {"blocks": 7, "stripes": 11}  # each data set's classes look alike only within it
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def pictures(count: int, seed: int, pattern: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` pictures and their labels: one fixed pattern of 4x4 blocks per class."""
    templates = np.kron(np.random.default_rng(pattern).random((len(CLASSES), 4, 4)) > 0.6, np.ones((4, 4))) > 0
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), count)
    brightness = rng.uniform(40, 120, (count, 1, 1))
    noise = rng.normal(60, 70, (count, SIDE, SIDE))
    return np.clip(templates[labels] * brightness + noise, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def generated(pattern: int) -> tuple[dict[str, str], tuple[Source, ...]]:
    """A data set's four files, by their MD5s, and the source that writes them where they are
    missing, as a mirror would."""
    arrays = [*pictures(TRAIN, 0, pattern), *pictures(TEST, 1, pattern)]
    made = {name: idx_bytes(array) for name, array in zip(FILES, arrays, strict=True)}

    def write(staging: Path) -> None:
        for name, content in made.items():
            (staging / name).write_bytes(content)

    return {name: hashlib.md5(content).hexdigest() for name, content in made.items()}, (Source("generated", write),)


class Blocks(InMemoryImages):
    name, folder = "blocks", "blocks"
    classes, dims = CLASSES, (1, SIDE, SIDE)
    files, sources = generated(PATTERNS["blocks"])

    def __init__(self, settings: TinySettings):
        super().__init__(settings.batch_size, settings.val_size, settings.seed, "val_size", settings.split_seed)
        self.data_dir = settings.data_dir

    @property
    def raw(self) -> Path:
        return Path(self.data_dir) / self.folder

    @property
    def location(self) -> str:
        return str(self.raw.resolve())

    @property
    def fingerprint(self) -> str:
        return digest(self.name, sorted(self.files.items()))

    def prepare_data(self) -> None:
        try:
            self.source = ensure_files(self.raw, self.files, self.sources, self.name)
        except FolderUnusable as error:
            raise SettingError("data_dir", str(error)) from None

    def read(self) -> dict:
        x, y, test_x, test_y = (torch.from_numpy(read_idx(self.raw / name)) for name in FILES)
        return {"train": (x.unsqueeze(1), y.long()), "test": (test_x.unsqueeze(1), test_y.long())}

    @staticmethod
    def picture(image, dims):
        return to_array(image, (dims[2], dims[1]), dims[0]).astype(np.float32) / 255


class Stripes(Blocks):
    """Another data set, another task: its own MLflow experiments and registered model."""

    name, folder = "stripes", "stripes"
    files, sources = generated(PATTERNS["stripes"])


class Dense(nn.Sequential):
    search_space = {"width": IntDistribution(4, 32)}

    def __init__(self, input_shape, num_classes, width):
        super().__init__(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), width), nn.ReLU(),
                         nn.Linear(width, num_classes))  # fmt: skip


class Conv(nn.Sequential):
    """``width`` filters of ``kernel`` x ``kernel``, pooled 4x4, then the classes."""

    search_space = {"width": IntDistribution(4, 32), "kernel": CategoricalDistribution([3, 5])}

    def __init__(self, input_shape, num_classes, width, kernel):
        channels, height, side = input_shape
        width += int(os.environ.get("TINY_EXTRA_FILTERS", 0))  # a network changed between two runs, for the tests
        super().__init__(nn.Conv2d(channels, width, kernel, padding=kernel // 2), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Flatten(), nn.Linear(width * (height // 4) * (side // 4), num_classes))  # fmt: skip


DATASETS = {"blocks": Blocks, "stripes": Stripes}
NETWORKS = {"dense": Dense, "conv": Conv}


class Classifier(pl.LightningModule):
    """Cross-entropy, SGD with momentum (a learning rate far too high makes it diverge: NaN):
    train_loss, val_loss and val_acc per epoch, test_loss and test_acc."""

    def __init__(self, net: nn.Module, lr: float):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def _evaluate(self, batch, stage):
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y))
        self.log(f"{stage}_acc", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


SEARCH_SPACE = {"batch_size": CategoricalDistribution([16, 32, 64]), "lr": FloatDistribution(3e-3, 0.3, log=True)}


def search_space(settings: TinySettings) -> dict:
    return {**SEARCH_SPACE, **NETWORKS[settings.model].search_space}


def build(settings: TinySettings):
    pl.seed_everything(settings.seed, verbose=False)
    data = DATASETS[settings.dataset](settings)
    kind = NETWORKS[settings.model]
    own = {name: getattr(settings, name) for name in ("width", "kernel") if name in kind.search_space}
    model = Classifier(kind(data.dims, len(data.classes), **own), settings.lr)
    model.example_input_array = torch.zeros(1, *data.dims)
    return model, data


def objective(trial, settings: TinySettings, run) -> float:
    point = suggest(trial, search_space(settings))
    settings = dataclasses.replace(settings, **point, seed=settings.seed + trial.number)
    model, data = build(settings)
    run.trainer(settings).fit(model, datamodule=data)
    return run.value


class HoldAtEpoch(pl.Callback):
    """For the tests that need a trial in flight at a chosen moment: with TINY_HOLD_AT_EPOCH=N
    and TINY_HOLD_FILE=PATH set, the first trial to reach epoch N (0-based) writes PATH, holding
    its pid, and waits there: until the file TINY_RELEASE_FILE names exists, or, without it, until
    it is stopped or killed. Trials after it, its own resumption included, go on. With
    TINY_HOLD_EVERY set, every trial holds so, PATH a folder where each writes a file named by
    its pid."""

    def __init__(self, epoch: int, path: Path, release: Path | None, every: bool):
        self.epoch, self.path, self.release, self.every = epoch, path, release, every

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch != self.epoch or batch_idx != 0:
            return
        try:
            with open(self.path / str(os.getpid()) if self.every else self.path, "x") as f:
                f.write(str(os.getpid()))  # only the first to get here holds, unless every trial does
        except FileExistsError:
            return
        while self.release is None or not self.release.exists():
            time.sleep(0.05)  # a request to stop raises KeyboardInterrupt here


def trainer(settings: TinySettings) -> dict:
    callbacks = [EarlyStopping(monitor="val_loss", patience=settings.patience)] if settings.patience else []
    if "TINY_HOLD_AT_EPOCH" in os.environ:
        release = Path(os.environ["TINY_RELEASE_FILE"]) if "TINY_RELEASE_FILE" in os.environ else None
        hold = HoldAtEpoch(int(os.environ["TINY_HOLD_AT_EPOCH"]), Path(os.environ["TINY_HOLD_FILE"]), release,
                           every="TINY_HOLD_EVERY" in os.environ)  # fmt: skip
        callbacks.append(hold)
    return {"callbacks": callbacks, "gradient_clip_val": settings.clip}


EXPERIMENT = Experiment(settings_class=TinySettings, build=build, search_space=search_space, objective=objective,
                        trainer=trainer, datasets=DATASETS)  # fmt: skip
