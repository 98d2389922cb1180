"""What the machinery is handed: an :class:`Experiment`, and what it expects of its parts.

The machinery never imports an experiment: the scripts hand one over. It knows a run's
settings, model and data only through what is written here, so that any data set, network or
search space that keeps to it trains, tunes, tracks and registers unchanged.

**The settings** (``Experiment.settings_class``): a frozen dataclass, every field with a default and a
``help`` in its metadata (each field is a flag; see machinery.cli.flags for the rest of the metadata).
The machinery reads by name only ``seed`` (the sampler's), ``max_epochs`` (the Trainer's),
``split_seed`` where the settings have one (see the data module), and two properties: ``task``
(what models are compared on: it names the MLflow experiments and the
registered model) and ``study`` (the default study name).

**The LightningModule** that ``build`` returns: ``forward`` maps a batch of inputs to outputs
(it is the model MLflow logs); ``example_input_array`` (Lightning's) is one input; it logs its
metrics once per validation epoch as ``val_*`` (``val_loss`` at least: a run that diverges is
told by it) and the same as ``test_*`` in testing; ``training_step(batch, batch_idx)`` returns
the loss, so that machinery.training.several_per_step can carry several batches per step.
``Experiment.metrics`` names the validation metrics and the direction that makes each better;
``Experiment.optimize`` is the one a study optimizes, and a run keeps its best epoch by, unless
``--objective`` names another (machinery.objectives).

**The LightningDataModule**: batches are ``(inputs, targets)``; ``prepare_data`` makes the data
present and verified and sets ``source`` (where it came from, in a few words); ``name`` names
the data set, ``fingerprint`` identifies its files (a study refuses other data),
``largest_batch`` is the most examples one step holds (the memory check sizes by it; an
``in_memory_bytes``, where it has one, is added to it), ``describe()`` returns a
:class:`DataSplit` for each split, which every run records as its MLflow dataset inputs, and
``classes`` names the classes, as the logged model's metadata says them. Its ``val_dataloader``
and ``test_dataloader`` give the same examples every time; ``train_dataloader`` gives the
training split (a study's linear baseline learns from it). Where the settings have a
``split_seed``, it chooses which examples are held out to validate on (``--repeats`` trains
again on other splits); the test split never follows it. Where one setting sizes every input
(a folder's ``--image-size``), ``resized_by`` names it: a network that cannot take the inputs is
told, before anything trains, the smallest size it takes. For predict.py, the
data set's class in ``Experiment.datasets`` may have a ``picture(image, shape)`` that prepares
a Pillow image as one input of that shape (a float32 array).

**The Trainer**: ``Experiment.trainer(settings)`` returns keyword arguments of
``pytorch_lightning.Trainer`` (its ``callbacks`` are added to the machinery's own); the
machinery sets the accelerator, the devices, the logger, ``max_epochs`` and checkpointing
itself, and refuses an experiment that sets them.

**The objective** (``Experiment.objective(trial, settings, run)``), one trial as
optuna-examples tell one: suggest a point, build the model and data, fit them with
``run.trainer(settings)`` (that Trainer, carrying the machinery's callbacks:
machinery.training.fit.TrackedRun) and return ``run.value``, the best epoch's value of what the
study optimizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunetrack.machinery.objectives import DEFAULT_METRIC, MAXIMIZE, MINIMIZE

if TYPE_CHECKING:  # Optuna takes a tenth of a second to import: predict.py needs none of it
    from optuna.distributions import BaseDistribution


def _lightning_defaults(settings) -> dict:
    return {}


@dataclass(frozen=True)
class Experiment:
    settings_class: type  # Settings() is the default run
    # settings -> (LightningModule, LightningDataModule), the initial weights drawn from settings.seed
    build: Callable[[Any], tuple[Any, Any]]
    # settings -> the searched settings, by name: what a study of these settings searches
    search_space: Callable[[Any], Mapping[str, BaseDistribution]]
    # (trial, settings, run) -> run.value after run.trainer(settings).fit(model, datamodule=data): the
    # objective's value at the best epoch (run: machinery.training.fit.TrackedRun)
    objective: Callable[..., float]
    # settings -> the Trainer's keyword arguments of a run: callbacks, gradient clipping, precision, ...
    trainer: Callable[[Any], dict] = _lightning_defaults
    # the data sets by name (the settings' dataset), for predict.py: how a picture is prepared for one
    datasets: Mapping[str, type] = dataclasses.field(default_factory=dict)
    # the metrics the LightningModule logs per validation epoch, and the direction that makes each better
    metrics: Mapping[str, str] = dataclasses.field(default_factory=lambda: {"val_loss": MINIMIZE, "val_acc": MAXIMIZE})
    # the one of them a study optimizes unless --objective names others
    optimize: str = DEFAULT_METRIC


@dataclass(frozen=True)
class DataSplit:
    """One split of a run's data, as MLflow records it among the run's inputs."""

    context: str  # "training", "validation" or "test"
    name: str  # the data set's
    digest: str  # of the files' checksums and of the split: other data, or another split, never share it
    location: str  # where the files are: a folder, or a URL
    origin: str  # how they got there: "existing files", "torchvision's mirrors", ...
    shape: tuple[int, ...]  # one input's
    dtypes: tuple[str, str] = ("float32", "int64")  # an input's, a target's (numpy's names)


class SettingError(ValueError):
    """A setting that cannot be used, raised by an experiment (its build, or its data module's
    prepare_data or setup): the scripts say so in one line that names the setting's flag."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting
