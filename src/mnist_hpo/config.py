"""TrainConfig: what one training run is, in a module light enough for the scripts to import
before their flags are checked."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """One point of the search space, plus how long and from which seed to train it."""

    lr: float = 1e-3
    hidden_dim: int = 128
    batch_size: int = 64
    max_epochs: int = 10
    seed: int = 0
    val_size: int = 5_000  # images held out of the 60,000 for validation
