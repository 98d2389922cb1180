"""How a study searches: which trials it proposes (the sampler) and which it stops early (the
pruner), each chosen by name (tune.py's --sampler and --pruner).

The default stays TPE with median pruning because no other method beat it beyond the spread of
its seeds: docs/search.md has the figures, and `python scripts/compare_search.py` makes them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial

# Each takes the trial's seed. TPE as Optuna 5 sets it up: multivariate (the parameters modelled
# jointly) and with its constant liar, which counts the trials other processes are running as
# if they had ended badly, so that no process proposes a point next to one that is being tried.
# The names are tune.py's choices (options.SAMPLERS and options.PRUNERS).
_SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}


def make_pruner(name: str, pruning: bool, max_epochs: int) -> optuna.pruners.BasePruner:
    """The pruner ``name``; judged by each epoch's val_loss (its step is the epoch, from 0)."""
    if not pruning:
        return optuna.pruners.NopPruner()
    if name == "median":
        # No trial is judged on its first two epochs, nor before five trials have finished.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=3)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    raise ValueError(f"no pruner {name!r}")


def make_sampler(name: str, seed: int, fixed: dict | None = None) -> optuna.samplers.BaseSampler:
    """The sampler ``name``, seeded per trial; the settings of ``fixed`` are proposed as they are
    (Optuna's PartialFixedSampler), and the others searched."""
    sampler = SeededPerTrial(_SAMPLERS[name], seed)
    if not fixed:
        return sampler
    with warnings.catch_warnings():  # its "experimental" warning would be the user's only line about it
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.PartialFixedSampler(fixed, sampler)


class SeededPerTrial(optuna.samplers.BaseSampler):
    """A sampler whose random draws for a trial come from (the study's seed, the trial's
    number) alone.

    Every process that shares a study runs a sampler of its own. Seeded per process, two of
    them that start at the same point of the study (two tune.py started together) would draw
    the same numbers and propose twin trials. A trial's number is
    unique in its study, so here each trial draws its own numbers, on one machine or many; one
    worker on a fresh study still replays exactly.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self.make, self.seed = make, seed
        self._sampler = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler = self.make(int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0]))
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]):
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ):
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state, values) -> None:
        self._sampler.after_trial(study, trial, state, values)
