"""What a study session leaves behind: the best trial tested once, its model, registered (as
train.py --register registers its run's), and the parent run's summary (best params, a CSV of
all trials, Optuna's plots).

Every table here takes its columns from the trials' own params, so it shows whatever the
search space holds.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tunetrack.machinery.objectives import MEASURED, Objective, number, sort_key
from tunetrack.machinery.study.space import format_value
from tunetrack.machinery.study.studies import METRICS_ATTR, RUN_ATTR, SETTINGS_ATTR, metrics_of, objective_of
from tunetrack.machinery.tracking import registry
from tunetrack.machinery.tracking.mlflow_runs import Tracker
from tunetrack.machinery.tracking.stores import public, reason

# The version's tag that names the data it was validated on: versions are compared on the same.
VALIDATED_ON = "validation_data"


class NotEvaluated(RuntimeError):
    """The best trial's weights cannot be had: its run, or the run's artifacts, are gone."""


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The complete trials, best first by the (first) objective."""
    key = sort_key(objective_of(study).directions[0])
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda trial: (key(trial.values[0]), trial.number))


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial; in a study of two objectives, the Pareto front's best on the first."""
    if objective_of(study).several:
        front = pareto_front(study)
        return front[0] if front else None
    complete = complete_trials(study)
    return complete[0] if complete else None


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The complete trials that no other beats on both objectives, best first on the first."""
    ours = {trial.number for trial in study.best_trials}
    return [trial for trial in complete_trials(study) if trial.number in ours]


def counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {state.name: sum(t.state == state for t in trials) for state in TrialState}


def param_names(trials: list[FrozenTrial]) -> list[str]:
    """Every parameter any of ``trials`` has, in the order they were first suggested."""
    return list(dict.fromkeys(name for trial in trials for name in trial.params))


def top_trials(study: optuna.Study, n: int = 10) -> list[FrozenTrial]:
    """The ``n`` best complete trials, best first; in a study of two objectives, its Pareto front's."""
    return (pareto_front(study) if objective_of(study).several else complete_trials(study))[:n]


def metric_names(trials: list[FrozenTrial], objective: Objective) -> list[str]:
    """The metrics a table of ``trials`` shows: the objective's, then the others their module
    logged (params and latency_ms only where they are objectives)."""
    logged = [name for trial in trials for name in metrics_of(trial) if name not in MEASURED]
    return list(dict.fromkeys([*objective.names, *logged]))


def table_rows(trials: list[FrozenTrial], objective: Objective) -> tuple[list[str], list[list[str]]]:
    """A header and one row per trial: its number, scores (the objective's first), params, best
    epoch and seconds."""
    params, metrics = param_names(trials), metric_names(trials, objective)
    header = ["trial", *metrics, *params, "best epoch", "seconds"]
    rows = [
        [
            str(trial.number),
            *(number(name, value) if (value := metrics_of(trial).get(name)) is not None else "-" for name in metrics),
            *(format_value(trial.params[name]) if name in trial.params else "-" for name in params),
            str(trial.user_attrs["best_epoch"] + 1),  # counted from 1, as every line counts them
            f"{trial.duration.total_seconds():.1f}",
        ]
        for trial in trials
    ]
    return header, rows


def top_trials_table(study: optuna.Study, n: int = 10) -> str:
    """The best trials as aligned text, for the console."""
    header, rows = table_rows(top_trials(study, n), objective_of(study))
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in [header, *rows])


def describe_params(trial: FrozenTrial, exact: bool = False) -> str:
    return ", ".join(f"{name}={format_value(value, exact)}" for name, value in trial.params.items())


@dataclass(frozen=True)
class Tested:
    """The best trial, its test metrics, and its network logged as an MLflow model."""

    trial: FrozenTrial
    metrics: dict[str, float]
    model_id: str
    data: list  # its data's splits (contract.DataSplit): what it was trained, validated and tested on
    datamodule: Any  # that data, to measure a champion validated on other data by (see judge_on)


def evaluate_best_trial(
    study: optuna.Study, tracker: Tracker, parent_run_id: str, experiment, options, best: FrozenTrial | None = None
) -> Tested | None:
    """Evaluate the best trial's best-epoch weights (``best``'s, where the repeats chose another)
    on the test set, once, and log them, with the model, on the parent run: the test metrics
    belong to the logged model too, so that where several processes of one study each tested
    their best, each model says its own. The test set plays no part in choosing the trial."""
    from tunetrack.machinery.training.fit import CHECKPOINT_ARTIFACT, evaluate, load_weights

    best = best or best_trial(study)
    if best is None:
        return None
    run_id = best.user_attrs[RUN_ATTR]
    settings = settings_of(experiment.settings_class, best.user_attrs[SETTINGS_ATTR])
    model, data = experiment.build(settings)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracker.download_artifact(run_id, str(CHECKPOINT_ARTIFACT), tmp)
        except Exception as error:  # noqa: BLE001 - MLflow says "not found" in several ways
            raise NotEvaluated(
                f"the best trial, trial {best.number}, has no checkpoint in {public(tracker.tracking_uri)} "
                f"(its MLflow run {run_id}: {reason(error)})"
            ) from None
        load_weights(model, path)
    test = evaluate(model, data, options.accelerator, "test")
    tracker.log_datasets(parent_run_id, [split for split in data.describe() if split.context == "test"])
    tested = {"tested_trial": best.number, "tested_run_id": run_id}
    model_id = registry.log_model(tracker, parent_run_id, model, data, settings.task, experiment.datasets)
    tracker.client.set_logged_model_tags(model_id, tested)
    tracker.log_metrics(parent_run_id, test, step=len(study.trials), model_id=model_id)
    tracker.set_tags(parent_run_id, tested)
    return Tested(best, test, model_id, data.describe(), data)


def judge_on(experiment, data, accelerator: str, tracker: Tracker) -> Callable[[dict[str, str]], dict | None]:
    """How a registered version does on ``data``'s validation split: what the experiment's own
    module logs of it there (val_loss, val_acc, ...) and its params and latency_ms, the module
    built from the settings its tags hold and given the weights of the checkpoint of the run its
    tags name. None where that cannot be had: a version registered without them, a run whose
    artifacts are gone, a model for inputs of another shape."""
    from tunetrack.machinery.study.retraining import typed
    from tunetrack.machinery.training.fit import CHECKPOINT_ARTIFACT, evaluate, load_weights, size_and_latency

    def judge(tags: dict[str, str]) -> dict | None:
        settings = typed(experiment.settings_class, tags)
        if "run_id" not in tags or not settings:
            return None
        try:
            model, _ = experiment.build(settings_of(experiment.settings_class, settings))
            with tempfile.TemporaryDirectory() as tmp:
                load_weights(model, tracker.download_artifact(tags["run_id"], str(CHECKPOINT_ARTIFACT), tmp))
            return {**evaluate(model, data, accelerator, "val"), **size_and_latency(model)}
        except Exception:  # noqa: BLE001 - whatever stands in the way, the version cannot be measured here
            return None

    return judge


def settings_of(settings_class: type, recorded: dict):
    """The settings a trial recorded, as ``settings_class``: a field it did not know takes its
    default, and one that is gone is left out."""
    names = {field.name for field in dataclasses.fields(settings_class)}
    return settings_class(**{name: value for name, value in recorded.items() if name in names})


def log_study_summary(study: optuna.Study, tracker: Tracker, parent_run_id: str, best: FrozenTrial | None) -> None:
    """The best trial's params and metrics (``best``: the one the study chose), trial counts, the
    Pareto front of a study of two objectives, all trials as CSV and Optuna's plots, on the
    parent run."""
    import matplotlib.pyplot as plt

    from tunetrack.machinery.study.plots import study_figures

    step, objective = len(study.trials), objective_of(study)
    tracker.log_metrics(parent_run_id, {f"n_{state.lower()}": n for state, n in counts(study).items()}, step=step)
    if best is not None:
        tracker.log_metrics(parent_run_id, {f"best_{k}": v for k, v in metrics_of(best).items()}, step=step)
        tags = {"best_trial": best.number, **{f"best.{k}": v for k, v in best.params.items()}}
        if objective.several:
            tags["pareto_front"] = " ".join(str(trial.number) for trial in pareto_front(study))
        tracker.set_tags(parent_run_id, tags)
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "trials.csv"
        trials_frame(study).to_csv(csv, index=False)
        tracker.log_artifact(parent_run_id, csv)
        if best is not None:
            for name, figure in study_figures(study, objective).items():
                figure.savefig(Path(tmp) / name, dpi=100, bbox_inches="tight")
                plt.close(figure)
                tracker.log_artifact(parent_run_id, Path(tmp) / name, "plots")


def trials_frame(study: optuna.Study):
    """Optuna's table of the trials (its value columns named after the objective: value_val_acc),
    with a column for each metric of the best epochs in place of their dictionary. The metrics
    are matched by trial number: other processes may add trials between the two reads."""
    frame = study.trials_dataframe()
    column = f"user_attrs_{METRICS_ATTR}"
    if column in frame:
        metrics = {trial.number: metrics_of(trial) for trial in study.get_trials(deepcopy=False)}
        names = list(dict.fromkeys(name for each in metrics.values() for name in each))
        for name in names:
            frame[name] = [metrics.get(number, {}).get(name) for number in frame["number"]]
        frame = frame.drop(columns=[column])
    return frame


def tested_candidate(tested: Tested, study_uid: str, options, repeated=None) -> registry.Candidate:
    """The tested best trial as a candidate: the version names its study and trial, and its run
    (whose checkpoint a later study validated on other data measures it by); its score is its
    best epoch's, or the mean of its runs and their standard error (``repeated``)."""
    trial = tested.trial
    facts = {"study": options.study_name, "study_uid": study_uid, "trial": trial.number,
             "run_id": trial.user_attrs[RUN_ATTR]}  # fmt: skip
    metric, direction = options.goal.first, options.goal.directions[0]
    score = repeated.score(metric, direction) if repeated else registry.Score(metric, direction, trial.values[0])
    tags = registry.version_tags(trial.user_attrs[SETTINGS_ATTR], tested.data, **facts, **metrics_of(trial),
                                 **tested.metrics)  # fmt: skip
    return registry.Candidate(tested.model_id, tags, score, same=("study_uid", "trial"), validated_on=VALIDATED_ON)


def register(candidate: registry.Candidate, datamodule, experiment, options, tracker: Tracker) -> registry.Registered:
    """Register ``candidate`` as ``options.registered_model``; the alias champion moves to it if
    it beats the champion, judged on the candidate's validation data (``datamodule``'s) under
    its objective (tracking.registry). train.py --register and every study register so."""
    judge = judge_on(experiment, datamodule, options.accelerator, tracker)
    return registry.register(tracker, options.registered_model, candidate, judge)
