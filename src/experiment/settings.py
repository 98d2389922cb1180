"""Every setting of one run, each with its default, in one place.

Each field is a flag of train.py and tune.py (``--hidden-dim`` for hidden_dim) with the help text
and the bounds written here; a study's search space (search.py) replaces some of them in each
trial. This module stays light, so that a bad flag is refused before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def setting(default, help: str, **more):
    """A field, with what its flag needs: ``help``, and where the usual do not fit, ``minimum``,
    ``maximum`` (numbers are otherwise at least 1, or above 0), ``choices`` (a registry, named
    as "module:NAME" and imported once the other flags are checked), or ``compared=False`` (a
    study's trials may differ in it and still compare)."""
    return field(default=default, metadata={"help": help, **more})


@dataclass(frozen=True)
class Settings:
    # What is learned, from what: a name registered in data.py, and one in networks.py.
    dataset: str = setting("mnist", "the data set", choices="experiment.data:DATASETS")
    model: str = setting("mlp", "the network", choices="experiment.networks:NETWORKS")
    # The network and its training.
    hidden_dim: int = setting(128, "hidden units (the MLP's hidden layer, the CNN's fully connected one)")
    lr: float = setting(1e-3, "AdamW's learning rate; it decays to 0 along a cosine over the run")
    weight_decay: float = setting(1e-2, "AdamW's decoupled weight decay (PyTorch's default)", minimum=0)
    batch_size: int = setting(64, "training batch size")
    max_epochs: int = setting(10, "epochs to train")
    seed: int = setting(0, "random seed: the same seed gives the same metrics, on a CPU", minimum=0, compared=False)
    # The data.
    val_size: int = setting(5_000, "training images held out for validation", maximum=59_999)
    data_dir: str = setting("data", "where the data sets are kept, fetched on first use", compared=False)

    @property
    def task(self) -> str:
        """What models trained with these settings are compared on: the data set. It names the
        MLflow experiments (TASK-train, TASK-tune) and the registered model (TASK-classifier)."""
        return self.dataset

    @property
    def study(self) -> str:
        """The study these settings go to unless --study-name says otherwise: a study never mixes
        data sets or networks."""
        return f"{self.dataset}-{self.model}"
