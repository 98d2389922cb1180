"""TrainConfig: what one training run is, in a module light enough for the scripts to import
before their flags are checked. Each field's help text becomes a flag of train.py (and, for the
fields a study does not search, of tune.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _setting(default, help: str, **bounds):
    """A field with the help text of its flag, and bounds beyond the usual (at least 1)."""
    return field(default=default, metadata={"help": help, **bounds})


@dataclass(frozen=True)
class TrainConfig:
    """One point of the search space, plus how long, on how much data and from which seed to
    train it."""

    lr: float = _setting(1e-3, "AdamW's learning rate; it decays to 0 along a cosine over the run")
    hidden_dim: int = _setting(128, "hidden units")
    batch_size: int = _setting(64, "training batch size")
    weight_decay: float = _setting(1e-2, "AdamW's decoupled weight decay (PyTorch's default)", minimum=0)
    max_epochs: int = _setting(10, "epochs to train")
    seed: int = _setting(0, "random seed: the same seed gives the same metrics, on a CPU", minimum=0)
    val_size: int = _setting(
        5_000, "of the 60,000 training images, how many to hold out for validation", maximum=59_999
    )
