"""A search space, as a mapping from setting names to Optuna distributions: a trial's point of
it, and how its values print."""

from __future__ import annotations

from collections.abc import Mapping

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution


def suggest(trial: optuna.Trial, space: Mapping[str, BaseDistribution]) -> dict:
    """The trial's value of every setting of ``space``, by name."""
    return {name: _suggest(trial, name, distribution) for name, distribution in space.items()}


def _suggest(trial: optuna.Trial, name: str, d: BaseDistribution):
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(name, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
    if isinstance(d, FloatDistribution):
        return trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
    raise TypeError(f"{name}: no suggest_* call for {type(d).__name__}")


def within(distribution: BaseDistribution, value) -> bool:
    """Whether ``value`` is a point of ``distribution``."""
    try:
        return distribution._contains(distribution.to_internal_repr(value))  # Optuna says it nowhere else
    except (ValueError, TypeError):
        return False


def format_value(value, exact: bool = False) -> str:
    """A parameter's value as tables and console lines show it: a float in three figures, or,
    ``exact``, in as many as read back as the same float."""
    if isinstance(value, float):
        return repr(value) if exact else f"{value:.2e}"
    return str(value)


def width(distribution: BaseDistribution | None) -> int:
    """Characters that every value of ``distribution`` fits in, so that lines align."""
    if isinstance(distribution, CategoricalDistribution):
        return max(len(format_value(choice)) for choice in distribution.choices)
    if isinstance(distribution, IntDistribution):
        return len(str(distribution.high))
    return len(format_value(1.0))
