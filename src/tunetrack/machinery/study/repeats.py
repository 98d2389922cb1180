"""The best trials trained again with other seeds, and on other validation splits where the data
has none of its own, so that the best is chosen by a mean and its noise is known.

A trial's value is one draw: its seed chose its initial weights and the order of its batches,
and a few hundred validation pictures move an accuracy in steps of a few tenths of a percent.
Trained again R times, each of the best K trials has R + 1 values, their mean and its standard
error; the best by the mean is the one tested and registered, and its version carries them, so
that the champion alias moves only for a model better beyond that noise (tracking.registry).
Every repeat is an MLflow run of the study's, tagged ``repeat_of``; the values are kept with the
study, so that a study continued on the same trials trains none of them twice.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from tunetrack.machinery.objectives import sort_key
from tunetrack.machinery.runtime import interrupts
from tunetrack.machinery.study.studies import SETTINGS_ATTR, STUDY_UID_TAG
from tunetrack.machinery.tracking.mlflow_runs import Tracker
from tunetrack.machinery.tracking.registry import Score

if TYPE_CHECKING:
    from tunetrack.machinery.study.trial import Session

# The study's user attribute that keeps each repeated trial's values, by trial number.
REPEATS_ATTR = "repeats"
# --repeats by default: where the training split holds at most this many examples, a repeat costs
# about what a trial does on a small data set, seconds (docs/objectives.md has the measurements).
CHEAP_EXAMPLES, CHEAP_REPEATS = 10_000, 2
TAG = "repeat_of"


@dataclass(frozen=True)
class Repeated:
    """A trial and the values of its objective: its own first, then its repeats'."""

    trial: FrozenTrial
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sem(self) -> float:
        """The standard error of the mean (the sample standard deviation over the square root of
        the runs)."""
        return statistics.stdev(self.values) / math.sqrt(len(self.values)) if len(self.values) > 1 else math.nan

    def score(self, metric: str, direction: str) -> Score:
        if len(self.values) < 2:
            return Score(metric, direction, self.values[0])
        return Score(metric, direction, self.values[0], self.mean, self.sem, len(self.values))

    def line(self, metric: str) -> str:
        return f"trial {self.trial.number}: {metric} {self.mean:.4f} ± {self.sem:.4f} ({len(self.values)} runs)"


def default_repeats(training_examples: int) -> int:
    return CHEAP_REPEATS if training_examples <= CHEAP_EXAMPLES else 0


def repeat_seeds(trial_seed: int, repeat: int) -> tuple[int, int]:
    """The seed and the split seed of a trial's ``repeat`` (from 1): a seed no trial of the study
    is likely to have drawn, and the split ``repeat`` (split 0 is the study's own)."""
    return int(np.random.SeedSequence([trial_seed, repeat]).generate_state(1)[0] % 2**31), repeat


def repeat_best(
    study: optuna.Study, candidates: list[FrozenTrial], repeats: int, session: Session, tracker: Tracker
) -> tuple[list[Repeated], float]:
    """Train each of ``candidates`` ``repeats`` times more (those runs the study does not hold
    yet), each in a run under the session's parent run; return them best first by their mean,
    and the seconds the new runs took. A request to stop ends the run under way (KILLED) and the
    repeats; those of a trial left short are left out."""
    from tunetrack.machinery.study.results import settings_of
    from tunetrack.machinery.training.fit import TrackedRun, fit

    experiment, options, parent_run_id = session.experiment, session.options, session.parent_run_id
    metric, direction = options.goal.first, options.goal.directions[0]
    kept = dict(study.user_attrs.get(REPEATS_ATTR) or {})
    seconds, done = 0.0, []
    for trial in candidates:
        values = list(kept.get(str(trial.number), []))[:repeats]
        for repeat in range(len(values) + 1, repeats + 1):
            if interrupts.requested():
                break
            recorded = settings_of(experiment.settings_class, trial.user_attrs[SETTINGS_ATTR])
            seed, split_seed = repeat_seeds(recorded.seed, repeat)
            changes = {"seed": seed}
            if any(field.name == "split_seed" for field in dataclasses.fields(recorded)):
                changes["split_seed"] = split_seed
            settings = dataclasses.replace(recorded, **changes)
            tags = {"optuna.study": study.study_name, STUDY_UID_TAG: study.user_attrs.get("uid", ""),
                    TAG: str(trial.number), "repeat": str(repeat)}  # fmt: skip
            started = time.perf_counter()
            try:
                with tracker.run(f"trial {trial.number} repeat {repeat}", parent_run_id=parent_run_id,
                                 tags=tags) as run_id, interrupts.interruptible():  # fmt: skip
                    model, data = experiment.build(settings)
                    run = TrackedRun(tracker, run_id, options, experiment.trainer, progress_bar=options.verbose)
                    result = fit(model, data, settings, run, test=False)
            except KeyboardInterrupt:
                break
            finally:
                seconds += time.perf_counter() - started
            values.append(result.metrics[metric])
            kept[str(trial.number)] = values
            study.set_user_attr(REPEATS_ATTR, kept)  # a study continued later reuses it
        if len(values) < repeats:
            break  # stopped
        done.append(Repeated(trial, (trial.values[0], *values)))
    key = sort_key(direction)
    return sorted(done, key=lambda r: (key(r.mean), r.trial.number)), seconds
