"""What a run builds, what a study searches, and one trial of it.

A study searches SEARCH_SPACE, the training's settings, and the network's own search_space
(networks.py): every table, plot, CSV column and console line of a study reads them back from
the trials. To search another setting of the training (weight decay, say), add a line here;
one of a network, a line in its search_space. A setting that does not exist yet needs a field
in settings.py and a use (in build(), or in the network's constructor) too.
"""

from __future__ import annotations

import dataclasses
import inspect

import optuna
import pytorch_lightning as pl
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from torch import nn

from tunetrack.experiment.data import DATASETS
from tunetrack.experiment.model import METRICS, OBJECTIVE, LitClassifier
from tunetrack.experiment.networks import NETWORKS, Standardize
from tunetrack.experiment.settings import Settings
from tunetrack.experiment.trainer import trainer
from tunetrack.machinery.contract import Experiment
from tunetrack.machinery.study.space import suggest

# The original pipeline's training hyperparameters and their ranges; its hidden_dim is the MLP's.
SEARCH_SPACE: dict[str, BaseDistribution] = {
    "batch_size": CategoricalDistribution([32, 64, 128, 256]),
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
}


def search_space(settings: Settings) -> dict[str, BaseDistribution]:
    """What a study of these settings searches: the training's, and its network's own, if any."""
    return {**SEARCH_SPACE, **getattr(NETWORKS[settings.model], "search_space", {})}


def build(settings: Settings) -> tuple[LitClassifier, pl.LightningDataModule]:
    """The LightningModule and the LightningDataModule of a run, the network's initial weights
    drawn from the run's seed."""
    pl.seed_everything(settings.seed, verbose=False)
    data = DATASETS[settings.dataset](settings)
    kind = NETWORKS[settings.model]
    network = kind(data.dims, len(data.classes), **hyperparameters(kind, settings))
    model = LitClassifier(nn.Sequential(Standardize(data.mean, data.std), network), len(data.classes), settings.lr,
                          settings.weight_decay)  # fmt: skip
    model.example_input_array = torch.zeros(1, *data.dims)  # Lightning's: what one input looks like
    return model, data


def hyperparameters(network: type[nn.Module], settings: Settings) -> dict:
    """The settings that ``network``'s constructor names, beyond the shape of its input and output."""
    names = [name for name in inspect.signature(network).parameters if name not in ("input_shape", "num_classes")]
    if missing := [name for name in names if not hasattr(settings, name)]:
        raise TypeError(f"{network.__name__} takes {', '.join(missing)}, which settings.py has no field for")
    return {name: getattr(settings, name) for name in names}


def objective(trial: optuna.Trial, settings: Settings, run) -> float:
    """One trial: suggest a point of the space, build its model and data, fit them, and return the
    objective's value at the best epoch (val_loss, or what --objective names).

    ``run.trainer(settings)`` is Lightning's Trainer with trainer.py's arguments and what the
    machinery adds: MLflow's logger (the trial's own run), the pruner, the best epoch's weights.
    Each trial trains from a seed of its own, derived from the study's: a study replays."""
    point = suggest(trial, search_space(settings))
    settings = dataclasses.replace(settings, **point, seed=settings.seed + trial.number)
    model, data = build(settings)
    trainer = run.trainer(settings)
    trainer.fit(model, datamodule=data)
    return run.value


# What the scripts hand the machinery.
EXPERIMENT = Experiment(settings_class=Settings, build=build, search_space=search_space, objective=objective,
                        trainer=trainer, datasets=DATASETS, metrics=METRICS, optimize=OBJECTIVE)  # fmt: skip
