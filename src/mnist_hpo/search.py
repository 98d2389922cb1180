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
from optuna.trial import FrozenTrial

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


def make_sampler(seed: int) -> optuna.samplers.BaseSampler:
    return SeededPerTrial(seed)


class SeededPerTrial(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler, whose random draws for a trial come from (the study's seed, the
    trial's number) alone.

    Every process that shares a study runs a sampler of its own. Seeded per process, two of
    them that start at the same point of the study draw the same numbers and propose twin
    trials (seen: 3 of 6 trials twins, with two tune.py started together). A trial's number is
    unique in its study, so here each trial draws its own numbers, on one machine or many;
    one worker on a fresh study still replays exactly. TPE as Optuna 5 sets it up otherwise:
    multivariate (the parameters modelled jointly) and with its constant liar, which counts
    the trials other processes are running as if they had ended badly, so that no process
    proposes a point next to one that is being tried.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._tpe = optuna.samplers.TPESampler(seed=seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial_seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
        self._tpe = optuna.samplers.TPESampler(seed=trial_seed)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)
