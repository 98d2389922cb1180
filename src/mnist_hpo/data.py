"""The MNIST LightningDataModule: the whole data set as tensors in memory, served by slicing.

The write-up's pipeline ran a ToTensor transform on every image and let a DataLoader collate
the batch sample by sample; for a model this small that per-sample Python work is most of an
epoch. Here the files are parsed once per process into one normalized float tensor per
split, kept on the training device, and a batch is a single indexing operation.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch import Tensor

from mnist_hpo.config import TrainConfig
from mnist_hpo.mnist_files import ensure_mnist
from mnist_hpo.speed import Chunks

# The training set's pixel mean and standard deviation (on the 0..1 scale), as usual for MNIST.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Fixed, and independent of the training seed: every run and every trial sees the same split.
SPLIT_SEED = 0
# Evaluation needs no small batches; a large one makes validation a handful of steps.
EVAL_BATCH_SIZE = 1_000


@dataclass(frozen=True)
class MNISTSplits:
    """Normalized float32 images of shape (N, 1, 28, 28) and int64 labels of shape (N,)."""

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def normalize(pixels: Tensor) -> Tensor:
    """uint8 pixels of shape (N, 28, 28) -> normalized float32 of shape (N, 1, 28, 28)."""
    return ((pixels.float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


# Folders whose files this process has verified (or been told are verified), and their source.
_verified: dict[str, str] = {}


def ensure_mnist_once(data_dir: str) -> str:
    """ensure_mnist, at most once per process and folder: MD5s over 55 MB are not free."""
    if data_dir not in _verified:
        _verified[data_dir] = ensure_mnist(data_dir)
    return _verified[data_dir]


def trust_verified(data_dir: str, source: str) -> None:
    """Take another process's word (tune.py's, before it starts its workers) that ``data_dir``
    holds the verified files, obtained from ``source``."""
    _verified[data_dir] = source


@functools.cache
def load_splits(data_dir: str, val_size: int, device: str = "cpu") -> MNISTSplits:
    """Parse and split the IDX files once per process: every trial after the first reuses them."""
    if device != "cpu":
        on_cpu = load_splits(data_dir, val_size)
        return MNISTSplits(**{name: tensor.to(device) for name, tensor in vars(on_cpu).items()})
    # torchvision is imported by Lightning anyway (through torchmetrics); its parser is fine.
    from torchvision.datasets import MNIST

    train = MNIST(data_dir, train=True, download=False)
    test = MNIST(data_dir, train=False, download=False)
    n = len(train.targets)
    if not 0 < val_size < n:
        raise ValueError(f"the validation set must hold between 1 and {n - 1} images, got {val_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    val, fit = order[:val_size], order[val_size:]
    images = normalize(train.data)
    return MNISTSplits(
        images[fit], train.targets[fit], images[val], train.targets[val], normalize(test.data), test.targets
    )


def first_test_digits(data_dir: str, count: int) -> Tensor:
    """The first ``count`` test images as a user's pixels: float32 in [0, 1], (N, 1, 28, 28)."""
    images, _ = test_digits(data_dir, count)
    return (images.float() / 255).unsqueeze(1)


def test_digits(data_dir: str, count: int) -> tuple[Tensor, Tensor]:
    """The first ``count`` test images as stored (uint8, (N, 28, 28)), and their labels."""
    from torchvision.datasets import MNIST

    test = MNIST(data_dir, train=False, download=False)
    return test.data[:count], test.targets[:count]


class InMemoryBatches:
    """Batches sliced out of tensors that already hold a whole split.

    With a generator it reshuffles at the start of every pass (every epoch); without one it
    serves the split in order.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, generator: torch.Generator | None = None):
        self.images, self.labels, self.batch_size, self.generator = images, labels, batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        if self.generator is None:
            for start in range(0, n, self.batch_size):
                yield self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]
            return
        order = torch.randperm(n, generator=self.generator, device=self.generator.device)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.images[index], self.labels[index]


class MNISTDataModule(pl.LightningDataModule):
    """MNIST's 60,000 training images split into ``60,000 - val_size`` to train on and
    ``val_size`` to validate on (a fixed split, the same for every seed), and the 10,000 test
    images. Training batches are reshuffled every epoch from ``seed``.

    ``prepare_data`` makes sure the original files are present and verified (see
    :mod:`mnist_hpo.mnist_files`); ``source`` then says where they came from.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike = "data",
        batch_size: int = TrainConfig.batch_size,
        val_size: int = TrainConfig.val_size,
        seed: int = TrainConfig.seed,
    ):
        super().__init__()
        self.data_dir = os.fspath(data_dir)
        self.batch_size = batch_size
        self.val_size = val_size
        self.seed = seed
        self.source: str | None = None
        self.device = torch.device("cpu")

    def prepare_data(self) -> None:
        self.source = ensure_mnist_once(self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            # Keep the data where the model is: no host-to-device copy per batch on a GPU.
            self.device = self.trainer.strategy.root_device
        self.splits = load_splits(self.data_dir, self.val_size, str(self.device))
        self._shuffle = torch.Generator(device=self.device).manual_seed(self.seed)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # The splits already live on the device; Lightning's generic move costs 90 µs a batch.
        return batch

    def train_dataloader(self) -> Chunks:
        # Several minibatches per Lightning step (see speed.py): training_step takes a list.
        return Chunks(
            InMemoryBatches(self.splits.train_images, self.splits.train_labels, self.batch_size, self._shuffle)
        )

    def val_dataloader(self) -> InMemoryBatches:
        return InMemoryBatches(self.splits.val_images, self.splits.val_labels, EVAL_BATCH_SIZE)

    def test_dataloader(self) -> InMemoryBatches:
        return InMemoryBatches(self.splits.test_images, self.splits.test_labels, EVAL_BATCH_SIZE)
