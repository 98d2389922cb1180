"""A new study's first trials: points already known to be sound, tried before the sampler's own.

Every trial of a fresh study would otherwise start from a random point of the space, and its
first result can be a poor one. The experiment's defaults are a known-good model (what
train.py trains with no flags), and another study's best trials are what was learned there: a
study of one network can start from another's learning rate and batch size, a study of one
data set from a like one's. Each is enqueued (Optuna's ``enqueue_trial``) with the settings the space holds; what
it does not, the sampler proposes.
"""

from __future__ import annotations

import optuna
from optuna.distributions import BaseDistribution

from tunetrack.machinery.study import results, studies
from tunetrack.machinery.study.space import format_value, within

WARM_START_BEST = 3  # --warm-start STUDY: that many of its best trials


def first_points(settings, space: dict[str, BaseDistribution], options, storage) -> list[dict]:
    """The points a new study tries first, each ``{"from": where, "params": {name: value}}``:
    the experiment's defaults (unless --no-defaults-first), then --warm-start's study's best.
    Settings the command line fixes are left to it; a point already listed is not again."""

    def held(params: dict) -> dict:
        return {name: value for name, value in params.items()
                if name in space and name not in options.fixed and within(space[name], value)}  # fmt: skip

    points = []
    if options.defaults_first:
        points.append({"from": "the experiment's defaults", "params": held({n: getattr(settings, n) for n in space})})
    if options.warm_start:
        name, count = options.warm_start, WARM_START_BEST
        head, _, tail = name.rpartition(":")
        if head and tail.isdigit():  # a study's name may hold a colon: only a last ":K" counts
            name, count = head, int(tail)
        for trial in _best_of(storage, name, count):
            points.append({"from": f"study {name!r}, trial {trial.number}", "params": held(trial.params)})
    unique = []
    for point in points:
        if point["params"] and point["params"] not in [p["params"] for p in unique]:
            unique.append(point)
    return unique


def _best_of(storage, name: str, count: int) -> list[optuna.trial.FrozenTrial]:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise studies.StudyMismatch("--warm-start", f"there is no study {name!r} in this storage") from None
    best = results.top_trials(study, count)
    if not best:
        raise studies.StudyMismatch("--warm-start", f"study {name!r} has no complete trial to start from")
    return best


def enqueue(study: optuna.Study, points: list[dict]) -> None:
    for point in points:
        study.enqueue_trial(point["params"], skip_if_exists=True)


def said(points: list[dict]) -> str:
    """One line: what the first trials will try."""
    shown = "; ".join(
        f"{point['from']} ({', '.join(f'{k}={format_value(v)}' for k, v in point['params'].items())})"
        for point in points
    )
    return f"first trials: {shown}"
