"""The tiny experiment's settings: few, as an experiment's are, and light (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from tunetrack.machinery.options import option as setting


@dataclass(frozen=True)
class TinySettings:
    dataset: str = setting("blocks", "the data set", choices="tiny.experiment:DATASETS")
    model: str = setting("dense", "the network", choices="tiny.experiment:NETWORKS")
    width: int = setting(16, "hidden units")
    kernel: int = setting(3, "the conv network's kernel size", choices=(3, 5))
    lr: float = setting(0.05, "SGD's learning rate (momentum 0.9)")
    batch_size: int = setting(32, "training batch size")
    max_epochs: int = setting(2, "epochs to train")
    patience: int | None = setting(None, "early stopping's patience (default: none)")
    clip: float | None = setting(None, "the gradients' largest norm (default: no clipping)")
    seed: int = setting(0, "random seed", minimum=0, compared=False)
    val_size: int = setting(100, "training images held out to validate on")
    split_seed: int = setting(0, "which training images are held out to validate on", minimum=0)
    data_dir: str = setting("data", "where the data sets are kept", compared=False)

    @property
    def task(self) -> str:
        return self.dataset

    @property
    def study(self) -> str:
        return f"{self.dataset}-{self.model}"
