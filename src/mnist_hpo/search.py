"""What a study searches, and how: the search space, the sampler and the pruner.

The space below is the one place that names the searched hyperparameters. A trial's
:class:`~mnist_hpo.config.TrainConfig` is built from it, and every table, plot, CSV column and
console line of a study reads the names and kinds back from the trials' own ``params`` and
``distributions``. To search another hyperparameter, give it a field in TrainConfig, use it
in the model (or the data), and add it here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from mnist_hpo.config import TrainConfig

# The write-up's three hyperparameters and their ranges.
SEARCH_SPACE: dict[str, BaseDistribution] = {
    "batch_size": CategoricalDistribution([32, 64, 128, 256]),
    "hidden_dim": IntDistribution(32, 512),
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
}


def suggest_config(trial: optuna.Trial, base: TrainConfig) -> TrainConfig:
    """The trial's point of the space, trained as ``base`` says (epochs, validation size), from
    a seed of its own derived from the study's, so that a study replays."""
    params = {name: _suggest(trial, name, distribution) for name, distribution in SEARCH_SPACE.items()}
    return dataclasses.replace(base, **params, seed=base.seed + trial.number)


def largest_config(base: TrainConfig) -> TrainConfig:
    """The most demanding point of the space (every parameter at its highest), for estimating
    the memory a worker needs."""
    highest = {
        name: max(d.choices) if isinstance(d, CategoricalDistribution) else d.high for name, d in SEARCH_SPACE.items()
    }
    return dataclasses.replace(base, **highest)


def _suggest(trial: optuna.Trial, name: str, d: BaseDistribution):
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(name, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
    if isinstance(d, FloatDistribution):
        return trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
    raise TypeError(f"{name}: no suggest_* call for {type(d).__name__}")


def format_value(value) -> str:
    """A parameter's value as tables and console lines show it."""
    return f"{value:.2e}" if isinstance(value, float) else str(value)


def make_pruner(pruning: bool) -> optuna.pruners.BasePruner:
    if not pruning:
        return optuna.pruners.NopPruner()
    # No trial is judged on its first two epochs, nor before five trials have finished.
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)


def make_sampler(seed: int, trials_before: int, worker: int) -> optuna.samplers.TPESampler:
    # One seed per (study seed, session, worker): one worker replays a fresh study exactly, a
    # continued study does not repeat its first trials, and workers do not propose twins.
    derived = int(np.random.SeedSequence([seed, trials_before, worker]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=derived)
