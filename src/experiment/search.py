"""What a run builds, what a study searches, and one trial of it.

SEARCH_SPACE is the one place that names the searched settings: every table, plot, CSV column
and console line of a study reads them back from the trials. To search another setting (weight
decay, say), add a line here; a setting that does not exist yet needs a field in settings.py
and a use in build() too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import optuna
import pytorch_lightning as pl
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from torch import nn

from experiment.data import DATASETS
from experiment.model import LitClassifier
from experiment.networks import NETWORKS, Standardize
from experiment.settings import Settings
from machinery.contract import Experiment
from machinery.space import suggest

# The original pipeline's three hyperparameters and their ranges.
SEARCH_SPACE: dict[str, BaseDistribution] = {
    "batch_size": CategoricalDistribution([32, 64, 128, 256]),
    "hidden_dim": IntDistribution(32, 512),
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
}


def build(settings: Settings) -> tuple[LitClassifier, pl.LightningDataModule]:
    """The LightningModule and the LightningDataModule of a run, the network's initial weights
    drawn from the run's seed."""
    pl.seed_everything(settings.seed, verbose=False)
    data = DATASETS[settings.dataset](settings.data_dir, settings.batch_size, settings.val_size, settings.seed)
    network = NETWORKS[settings.model](data.dims, len(data.classes), settings.hidden_dim)
    model = LitClassifier(nn.Sequential(Standardize(data.mean, data.std), network), settings.lr, settings.weight_decay)
    model.example_input_array = torch.zeros(1, *data.dims)  # Lightning's: what one input looks like
    return model, data


def objective(trial: optuna.Trial, settings: Settings, fit: Callable) -> float:
    """One trial: suggest a point of the space, build its model and data, fit (Lightning trains,
    MLflow tracks, the pruner may stop it), and return the best epoch's val_loss.

    ``fit(model, data, settings)`` is the machinery's: the ``pl.Trainer`` and its callbacks are
    in machinery/training.py, the MLflow run and the pruning in machinery/trial.py. Each trial
    trains from a seed of its own, derived from the study's: a study replays."""
    settings = dataclasses.replace(settings, **suggest(trial, SEARCH_SPACE), seed=settings.seed + trial.number)
    model, data = build(settings)
    return fit(model, data, settings).val_loss


# What the scripts hand the machinery.
EXPERIMENT = Experiment(settings=Settings, build=build, search_space=SEARCH_SPACE, objective=objective)
