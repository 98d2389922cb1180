"""What a study optimizes and a run keeps its best epoch by: one metric, or two, each with the
direction that makes it better.

The metrics are the LightningModule's own, logged once per validation epoch (the experiment
declares them and their directions: ``Experiment.metrics``), and two that the machinery
measures of every run: ``params``, the network's parameter count, and ``latency_ms``, the time
it takes to classify one input on the machine it trained on. ``--objective`` names one or two
(``val_acc``, ``val_acc,params``); ``--direction`` says which way a metric of the user's own
goes. This module imports nothing heavy: the flags are checked before torch starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MINIMIZE, MAXIMIZE = "minimize", "maximize"
# What the machinery measures of every run, beside what the LightningModule logs.
MEASURED = {"params": MINIMIZE, "latency_ms": MINIMIZE}
# The default where an experiment declares none (machinery.contract).
DEFAULT_METRIC = "val_loss"


class ObjectiveError(ValueError):
    """An --objective or --direction that cannot be used; ``flag`` names which."""

    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag


@dataclass(frozen=True)
class Objective:
    """The metrics a study optimizes, in order, each with its direction."""

    names: tuple[str, ...]
    directions: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str, direction: str | None, known: Mapping[str, str]) -> Objective:
        """``spec`` ("val_acc", or "val_acc,params") with ``direction`` ("maximize", or one per
        metric, comma-separated; None: each metric's known one). ``known``: the experiment's
        metrics and their directions."""
        names = tuple(name.strip() for name in spec.split(","))
        if not 1 <= len(names) <= 2 or not all(names) or len(set(names)) < len(names):
            raise ObjectiveError("--objective", f"expected one metric or two different ones, got {spec!r}")
        if all(name in MEASURED for name in names):
            raise ObjectiveError(
                "--objective",
                f"{' and '.join(names)} go beside a metric the LightningModule logs per validation epoch, which "
                f"picks each run's best epoch: --objective val_acc,{names[0]}, say",
            )
        known = {**known, **MEASURED}
        given = [d.strip() for d in direction.split(",")] if direction else [None] * len(names)
        if len(given) != len(names):
            raise ObjectiveError("--direction", f"one direction per metric of --objective {spec}, got {direction!r}")
        directions = []
        for name, chosen in zip(names, given, strict=True):
            if chosen not in (None, MINIMIZE, MAXIMIZE):
                raise ObjectiveError("--direction", f"expected {MINIMIZE} or {MAXIMIZE}, got {chosen!r}")
            if name in known and chosen not in (None, known[name]):
                said = f"{name} is better {comparative(known[name])}: it is {known[name]}d"
                raise ObjectiveError("--direction", said)
            if name not in known and chosen is None:
                raise ObjectiveError(
                    "--objective",
                    f"{name} is none of the metrics known here ({', '.join(known)}); a metric of your "
                    f"LightningModule's own needs its direction: --direction {MAXIMIZE} or --direction {MINIMIZE}",
                )
            directions.append(chosen or known[name])
        return cls(names, tuple(directions))

    @classmethod
    def recorded(cls, definition: Mapping) -> Objective:
        """The objective a study's definition records (one from before they did: val_loss)."""
        pairs = definition.get("objective") or [[DEFAULT_METRIC, MINIMIZE]]
        return cls(tuple(name for name, _ in pairs), tuple(direction for _, direction in pairs))

    def record(self) -> list[list[str]]:
        return [[name, direction] for name, direction in zip(self.names, self.directions, strict=True)]

    @property
    def spec(self) -> str:
        """As --objective takes it."""
        return ",".join(self.names)

    @property
    def first(self) -> str:
        return self.names[0]

    @property
    def several(self) -> bool:
        return len(self.names) > 1

    def __str__(self) -> str:
        return ", ".join(f"{name} ({direction})" for name, direction in zip(self.names, self.directions, strict=True))

    @property
    def per_epoch(self) -> tuple[str, str]:
        """The metric a run's best epoch is chosen by, and its direction: the first objective that
        changes from one epoch to the next (params and latency_ms do not)."""
        return next((n, d) for n, d in zip(self.names, self.directions, strict=True) if n not in MEASURED)

    def value(self, metrics: Mapping[str, float]) -> float | tuple[float, ...]:
        """What Optuna is told: the one metric's value, or a tuple of both."""
        values = tuple(metrics[name] for name in self.names)
        return values if self.several else values[0]


def better(a: float, b: float, direction: str) -> bool:
    """Whether ``a`` is strictly better than ``b``; a value that is no number never is."""
    if not math.isfinite(a):
        return False
    return not math.isfinite(b) or (a < b if direction == MINIMIZE else a > b)


def sort_key(direction: str):
    """A key that sorts values best first (a value that is no number last)."""
    return lambda value: (not math.isfinite(value), value if direction == MINIMIZE else -value)


def comparative(direction: str) -> str:
    """ "lower" or "higher": the way ``direction`` makes a value better."""
    return "lower" if direction == MINIMIZE else "higher"


def shown(metrics: Mapping[str, float], first: Sequence[str] = (), separator: str = " ") -> str:
    """Metrics as a line says them, ``first`` first: ``val_acc 0.9726 val_loss 0.0967``; a count
    whole, a time in three figures."""
    names = [*(name for name in first if name in metrics), *(name for name in metrics if name not in first)]
    return separator.join(f"{name} {number(name, metrics[name])}" for name in names)


def number(name: str, value: float) -> str:
    """A metric's value as lines and tables show it."""
    if name == "params":
        return f"{value:,.0f}"
    if name == "latency_ms":
        return f"{value:.3g}"
    return f"{value:.4f}"
