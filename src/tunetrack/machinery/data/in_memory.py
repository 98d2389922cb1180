"""A LightningDataModule for pictures that fit in memory: what keeps an epoch of a small
network near a plain PyTorch loop's.

A subclass says what its data is and reads it (:meth:`InMemoryImages.read`); this class
splits it, keeps every split on the training device, as uint8 where the pictures are bytes
(a quarter of float32's memory), and serves each batch as one indexing operation, converted
to pixels in [0, 1] on the way out: a DataLoader's per-picture work costs more than a small
network's step (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import json
import math

import pytorch_lightning as pl
import torch
from torch import Tensor

from tunetrack.machinery.contract import DataSplit, SettingError
from tunetrack.machinery.data.batches import InMemoryBatches

# Which pictures are held out to validate on, unless a data module is given another: fixed, and
# independent of the training seed, so that every run and every trial sees the same split.
SPLIT_SEED = 0
# Evaluation needs no small batches; a large one makes validation a handful of steps.
EVAL_BATCH_SIZE = 1_000

Split = tuple[Tensor, Tensor]


class InMemoryImages(pl.LightningDataModule):
    """Training, validation and test splits of pictures and class indices, in memory.

    A subclass sets ``name``, ``classes`` and ``dims`` (one picture's shape, channels first),
    ``location`` (where the data is, in words or a path) and ``fingerprint`` (its files'
    identity), makes the data present in ``prepare_data`` (setting ``source``), and returns
    its splits from ``read``. ``mean`` and ``std`` are the training pixels' per channel, in
    [0, 1] units: computed here, or set by the subclass where they are known.

    ``held_out`` pictures of the training split are held out to validate on (a fixed split,
    the same for every seed; ``split_seed`` chooses another), unless ``read`` returns a
    validation split of its own; a number the data cannot spare is a SettingError of the setting
    ``held_out_by``. Training batches are reshuffled every epoch from ``seed``.
    """

    name: str
    classes: tuple[str, ...]
    dims: tuple[int, ...]
    picture = None  # how predict.py prepares a photo: picture(image, dims) -> float32 array of dims, in [0, 1]

    def __init__(self, batch_size: int, held_out: int, seed: int, held_out_by: str, split_seed: int = SPLIT_SEED):
        super().__init__()
        self.batch_size, self.held_out, self.seed, self.held_out_by = batch_size, held_out, seed, held_out_by
        self.split_seed = split_seed
        self.source: str | None = None  # where prepare_data found the data, in a few words
        self.device = torch.device("cpu")

    # What a subclass provides.

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    @property
    def location(self) -> str:
        raise NotImplementedError

    def read(self) -> dict[str, Split]:
        """``{"train": (images, labels), "test": (images, labels)}``, and ``"val"`` where the data
        comes with a validation split: images of shape (N, *dims), uint8 (0 to 255) or float32
        (0 to 1); labels int64 class indices."""
        raise NotImplementedError

    def identity(self) -> tuple:
        """What ``read`` returns depends on: one process reads each once."""
        return (type(self), self.location, self.fingerprint)

    @property
    def own_validation(self) -> bool:
        """Whether ``read`` returns a validation split of its own (``split_seed`` then changes nothing)."""
        return False

    # What this class gives.

    @property
    def mean(self) -> tuple[float, ...]:
        return self._statistics()[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._statistics()[1]

    @property
    def largest_batch(self) -> int:
        return max(self.batch_size, EVAL_BATCH_SIZE)

    @property
    def in_memory_bytes(self) -> int:
        """What the data takes in memory beyond a process's own (see machinery.runtime.memory)."""
        return 0

    def describe(self) -> list[DataSplit]:
        """Each split, as a run records it in MLflow: the digest follows the data and the split."""
        seed = SPLIT_SEED if self.own_validation else self.split_seed
        split = {"training": ("train", self.held_out, seed), "validation": ("val", self.held_out, seed)}
        return [
            DataSplit(
                context,
                self.name,
                digest(self.fingerprint, split.get(context, "test")),
                self.location,
                self.source,
                self.dims,
            )  # fmt: skip
            for context in ("training", "validation", "test")
        ]

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            # Keep the data where the model is: no host-to-device copy per batch on a GPU.
            self.device = self.trainer.strategy.root_device
        self.splits = _splits(self, str(self.device))
        self._shuffle = torch.Generator(device=self.device).manual_seed(self.seed)

    def state_dict(self) -> dict:
        """Where the training batches' shuffling stands, for a run taken up again (Lightning keeps
        it in a checkpoint, and restores it after setup)."""
        return {"shuffle": self._shuffle.get_state()} if hasattr(self, "_shuffle") else {}

    def load_state_dict(self, state: dict) -> None:
        if "shuffle" in state:
            self._shuffle.set_state(state["shuffle"].cpu())

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        return batch  # already there (setup): Lightning's generic move would walk it for nothing

    def train_dataloader(self) -> InMemoryBatches:
        return InMemoryBatches(*self.splits["train"], self.batch_size, self._shuffle)

    def val_dataloader(self) -> InMemoryBatches:
        return InMemoryBatches(*self.splits["val"], EVAL_BATCH_SIZE)

    def test_dataloader(self) -> InMemoryBatches:
        return InMemoryBatches(*self.splits["test"], EVAL_BATCH_SIZE)

    def _statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        channels = self.dims[0]
        if torch.empty(0).device.type == "meta":  # a model built for its shapes only: its tensors hold no values
            return (0.0,) * channels, (1.0,) * channels
        key = (self.identity(), self.held_out, self.split_seed)
        if key not in _statistics_cache:
            _statistics_cache[key] = _channel_statistics(_splits(self, "cpu")["train"][0])
        return _statistics_cache[key]


def _channel_statistics(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Each channel's mean and standard deviation over ``images``, in [0, 1]."""
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), 1_000):  # in chunks: a float copy of the whole would be 4x the data
        chunk = images[start : start + 1_000].to(torch.float64).transpose(0, 1).flatten(1) / scale
        total += chunk.sum(dim=1)
        squares += chunk.square().sum(dim=1)
    count = images[:, 0].numel()
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(max(s, 1e-6) for s in std.tolist())


# Each data set as read and split, and its training split's statistics, by what identifies it:
# once per process, so that every trial after the first reuses them.
_split_cache: dict[tuple, dict[str, Split]] = {}
_statistics_cache: dict[tuple, tuple[tuple[float, ...], tuple[float, ...]]] = {}


def _splits(data: InMemoryImages, device: str) -> dict[str, Split]:
    key = (data.identity(), data.held_out, data.split_seed, device)
    if key not in _split_cache:
        if device != "cpu":
            _split_cache[key] = {
                name: tuple(t.to(device) for t in split) for name, split in _splits(data, "cpu").items()
            }
        else:
            with torch.device("cpu"):  # real tensors, even for a model built on the meta device
                splits = _read_and_split(data)
            _split_cache[key] = splits
    return _split_cache[key]


def _read_and_split(data: InMemoryImages) -> dict[str, Split]:
    splits = data.read()
    if "val" not in splits:
        images, labels = splits["train"]
        n = len(labels)
        if not 0 < data.held_out < n:
            raise SettingError(data.held_out_by, f"{data.held_out} of {n} images to validate on leaves none to train")
        if n - data.held_out < tenth(n):  # a model of a few images, validated on a lucky few hundred
            raise SettingError(
                data.held_out_by,
                f"{data.held_out} of {n} images to validate on leaves {n - data.held_out} to train: fewer than a "
                f"tenth; hold out at most {n - tenth(n)}",
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(data.split_seed))
        val, fit = order[: data.held_out], order[data.held_out :]
        splits = {**splits, "train": (images[fit], labels[fit]), "val": (images[val], labels[val])}
    return splits


def digest(*parts) -> str:
    """A short digest of JSON-able ``parts``: what a data set, or one of its splits, is called in MLflow."""
    return hashlib.md5(json.dumps(parts).encode()).hexdigest()[:12]


def tenth(n: int) -> int:
    """A tenth of ``n``, at least one: what a split is held out of a data set that has none."""
    return max(1, math.ceil(n / 10))
