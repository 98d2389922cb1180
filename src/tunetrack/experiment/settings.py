"""Every setting of one run, each with its default, in one place.

Each field is a flag of train.py and tune.py (``--hidden-dim`` for hidden_dim) with the help text
and the bounds written here; a study's search space (search.py, and each network's own in
networks.py) replaces some of them in each trial. This module stays light, so that a bad flag
is refused before torch is imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# A field, with what its flag needs: its help, and bounds or choices where the usual do not fit.
from tunetrack.machinery.options import option as setting


@dataclass(frozen=True)
class Settings:
    # What is learned, from what: a name registered in data.py, and one in networks.py.
    dataset: str = setting("mnist", "the data set; folder: your own pictures, in --data-dir",
                           choices="tunetrack.experiment.data:DATASETS")  # fmt: skip
    model: str = setting("mlp", "the network", choices="tunetrack.experiment.networks:NETWORKS")
    # The networks' own (each takes the settings its constructor names).
    hidden_dim: int = setting(128, "hidden units (the MLP's hidden layer, the CNN's fully connected one)")
    # The training.
    lr: float = setting(1e-3, "AdamW's learning rate; it decays to 0 along a cosine over the run")
    weight_decay: float = setting(1e-2, "AdamW's decoupled weight decay (PyTorch's default)", minimum=0)
    batch_size: int = setting(64, "training batch size")
    max_epochs: int = setting(10, "epochs to train")
    patience: int | None = setting(None, "stop when val_loss has not improved for this many epochs (default: never)")
    gradient_clip: float | None = setting(None, "clip the gradients' norm to this at every step (default: never)")
    seed: int = setting(0, "random seed: the same seed gives the same metrics, on a CPU", minimum=0, compared=False)
    # The data.
    val_size: int | None = setting(
        None, "training images held out to validate on (default: 5,000 of MNIST's; a tenth of a folder's)"
    )
    split_seed: int = setting(
        0, "which training images are held out to validate on, where the data has no validation folder; tune.py "
        "--repeats trains the best again on others", minimum=0,
    )  # fmt: skip
    data_dir: str = setting(
        "data",
        "where the data sets are kept, fetched on first use; with --dataset folder, your pictures' folder",
        compared=False,
    )
    image_size: int | None = setting(None, "a folder's pictures resized to this square (default: their usual size)")
    channels: int | None = setting(None, "a folder's pictures in grey (1) or colour (3) (default: as they are)",
                                   choices=(1, 3))  # fmt: skip
    data_name: str | None = setting(None, "a folder's name in MLflow and the registry (default: the folder's)")

    @property
    def task(self) -> str:
        """What models trained with these settings are compared on: the data set (a folder of
        pictures by its name). It names the MLflow experiments (TASK-train, TASK-tune) and the
        registered model (TASK-classifier)."""
        if self.dataset != "folder":
            return self.dataset
        name = self.data_name or Path(self.data_dir).resolve().name
        return re.sub(r"[^\w.-]+", "-", name).strip("-.") or "pictures"

    @property
    def study(self) -> str:
        """The study these settings go to unless --study-name says otherwise: a study never mixes
        data sets or networks."""
        return f"{self.task}-{self.model}"
