"""What a tune.py session prints: a line per trial as it ends, and the study's summary (its
trials, the best, the test, the baselines, where the time went, and what to run next)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from tunetrack.machinery.objectives import MEASURED, shown
from tunetrack.machinery.runtime import devices
from tunetrack.machinery.study import repeats, results, studies
from tunetrack.machinery.study.baseline import Baseline
from tunetrack.machinery.study.retraining import train_again
from tunetrack.machinery.study.space import format_value, width
from tunetrack.machinery.study.studies import RESTARTED_ATTR, SETTINGS_ATTR
from tunetrack.machinery.tracking.stores import public


@dataclass(frozen=True)
class TrialReport:
    """What a worker tells about a finished trial: enough for one line of output."""

    number: int
    state: str
    params: dict
    distributions: dict[str, BaseDistribution]
    metrics: dict[str, float]  # at its best epoch (none for a trial that did not complete)
    seconds: float
    note: str = ""
    gpu: str = ""  # the GPU that trained it, as CUDA_VISIBLE_DEVICES names it; "" on a CPU

    @classmethod
    def of(cls, trial: FrozenTrial, note: str = "") -> TrialReport:
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        attrs = trial.user_attrs
        if trial.state == TrialState.WAITING:
            note = note or studies.resumes_from(trial)
        note = note or attrs.get("pruned") or attrs.get("fail_reason") or attrs.get("stopped_early", "")
        if attrs.get(RESTARTED_ATTR) and trial.state.is_finished():
            note = "; ".join(filter(None, [f"started again from epoch 1: {attrs[RESTARTED_ATTR]}", note]))
        return cls(
            trial.number,
            trial.state.name,
            trial.params,
            trial.distributions,
            studies.metrics_of(trial),
            seconds,
            note,
            # This process's GPU, for a trial it ran itself (not another process's, found dead).
            devices.this_process_id() if attrs.get(studies.WORKER_ATTR) == studies.worker_id() else "",
        )

    @classmethod
    def left(cls, trial: FrozenTrial, why: str) -> TrialReport:
        """A trial this process ran but another one took up (its record, whatever its state now,
        is that other process's): said as LEFT, with no scores."""
        return dataclasses.replace(cls.of(trial, note=why), state="LEFT", metrics={})

    def line(self, objective: tuple[str, ...] = ()) -> str:
        """One line: the trial's number, state, point, and its scores, those of ``objective`` first
        (params and latency_ms only where they are objectives)."""
        params = " ".join(
            f"{name}={format_value(value):>{width(self.distributions.get(name))}}"
            for name, value in self.params.items()
        )
        metrics = {k: v for k, v in self.metrics.items() if k in objective or k not in MEASURED}
        scores = (
            " ".join(filter(None, [shown(metrics, objective), self.note]))
            if self.state == TrialState.COMPLETE.name
            else self.note
        )
        gpu = f"  gpu {self.gpu}" if self.gpu else ""
        return f"trial {self.number:>3} {self.state:<8} {params}  {scores}  {self.seconds:5.1f} s{gpu}"


@dataclass
class Ending:
    """What a session found after its trials, for its summary."""

    notes: list[str]
    best: FrozenTrial | None = None  # the trial it tests and registers
    repeated: list[repeats.Repeated] = field(default_factory=list)
    repeats_said: list[str] = field(default_factory=list)
    baselines: list[Baseline] = field(default_factory=list)
    test: dict[str, float] | None = None
    time: str = ""  # where the session's time went (time_split)


def first_line(study: optuna.Study, options, to_add: int) -> str:
    where = f"{public(options.storage)}, study {study.study_name!r}"
    total = f", to a total of {options.until} (--until)" if options.until is not None else ""
    if not study.trials:
        return f"new study in {where}: adding {to_add} trials{total}"
    counted = sum(t.state in studies.TOWARD_TOTAL for t in study.get_trials(deepcopy=False))
    return (f"continuing {where}: {len(study.trials)} trials so far, {counted} of them complete, pruned or under way; "
            f"adding {to_add}{total}")  # fmt: skip


def repeats_said(repeated: list[repeats.Repeated], count: int, seconds: float, study, options) -> list[str]:
    if not repeated:
        return ["repeats stopped before the first trial had all of its runs"]
    trials = sum(t.duration.total_seconds() for t in study.trials if t.duration)
    metric = options.goal.first
    lines = [
        f"repeats: the best {len(repeated)} trials trained {count} more times each, with new seeds (and validation "
        f"splits, where the data has no validation folder): {seconds:.1f} s; the trials took {trials:.1f} s, added up"
    ]
    lines += [f"  {r.line(metric)}" for r in repeated]
    return lines


def still_running_elsewhere(study: optuna.Study, grace: int) -> list[str]:
    """The study's trials that other processes still run, as this one stops."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return [
        f"trial {trial.number} still runs on {owner.get('host', '?')} (pid {owner.get('pid', '?')}): it ends there, "
        f"or, if its heartbeat stops for {grace} s, the next process to start a trial of this study hands it back "
        "to the study, to go on from its last epoch (or marks it FAIL: --resume-attempts)"
        for trial in running
        for owner in [trial.user_attrs.get(studies.WORKER_ATTR, {})]
    ]


def print_summary(study, tracker, parent_run_id, options, end: Ending) -> None:
    counts = results.counts(study)
    print(
        f"\nstudy {study.study_name!r}: {len(study.trials)} trials, {counts['COMPLETE']} complete, "
        f"{counts['PRUNED']} pruned, {counts['FAIL']} failed"
        + (f", {counts['RUNNING']} running" if counts["RUNNING"] else "")
        + (f", {counts['WAITING']} cut short, to resume" if counts["WAITING"] else "")
    )
    objective, best = options.goal, end.best
    if best is None:
        print("no trial has completed yet")
    else:
        if objective.several:
            front = results.pareto_front(study)
            print(f"Pareto front of {objective}: the {len(front)} trials that no other beats on both, best first on "
                  f"{objective.first}")  # fmt: skip
        print(results.top_trials_table(study, n=len(results.pareto_front(study)) if objective.several else 5))
        for line in end.repeats_said:
            print(line)
        seed = best.user_attrs.get(SETTINGS_ATTR, {}).get("seed")
        chosen = "the front's best on the first objective; " if objective.several else ""
        chosen = "the best by the mean of its runs; " if end.repeated else chosen
        metrics = studies.metrics_of(best)
        scores = {name: value for name, value in metrics.items() if name in objective.names or name not in MEASURED}
        print(f"best: trial {best.number} ({chosen}{results.describe_params(best, exact=True)}; seed {seed}): "
              f"{shown(scores, objective.names, ', ')}")  # fmt: skip
        if end.test:
            tested = shown(end.test, _test_names(_names(objective, best)), ", ")
            print(f"test (the best trial's weights, evaluated once): {tested}")
    for baseline in end.baselines:
        print(baseline.line(_names(objective, best)))
    for note in end.notes:
        print(note)
    print(end.time)
    if best is not None:
        print(f"train it again: {train_again(study.study_name, best.number, options.storage)}")
    again = "the same command continues it"
    if options.until is not None:
        again = f"the same command adds what its {options.until} lack; a larger --until, or --n-trials N, adds more"
    print(
        f"look at it: {tracker.ui_command()}   then {tracker.run_url(parent_run_id)}\n"
        f"the study: {public(options.storage)}, study {study.study_name!r}; {again}"
    )


def _names(objective, best) -> list[str]:
    """The metrics a baseline's line shows: those the best trial's line shows."""
    logged = studies.metrics_of(best) if best is not None else {}
    return [*objective.names, *(name for name in logged if name not in objective.names and name not in MEASURED)]


def _test_names(names) -> list[str]:
    """The test metrics that go with validation ones: test_acc for val_acc."""
    return [name.replace("val_", "test_", 1) for name in names if name.startswith("val_")]
