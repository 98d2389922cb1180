"""What a study session leaves behind: the best trial tested once, its model, and the parent
run's summary (best params, a CSV of all trials, Optuna's plots).

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

from tunetrack.machinery.study.space import format_value
from tunetrack.machinery.study.studies import RUN_ATTR, SETTINGS_ATTR
from tunetrack.machinery.tracking import registry
from tunetrack.machinery.tracking.mlflow_runs import Tracker
from tunetrack.machinery.tracking.stores import public, reason


class NotEvaluated(RuntimeError):
    """The best trial's weights cannot be had: its run, or the run's artifacts, are gone."""


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda trial: trial.value) if complete else None


def counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {state.name: sum(t.state == state for t in trials) for state in TrialState}


def param_names(trials: list[FrozenTrial]) -> list[str]:
    """Every parameter any of ``trials`` has, in the order they were first suggested."""
    return list(dict.fromkeys(name for trial in trials for name in trial.params))


def top_trials(study: optuna.Study, n: int = 10) -> list[FrozenTrial]:
    """The ``n`` best complete trials, best first."""
    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.value)[:n]


def table_rows(trials: list[FrozenTrial]) -> tuple[list[str], list[list[str]]]:
    """A header and one row per trial: its number, scores, params, best epoch and seconds."""
    params = param_names(trials)
    header = ["trial", "val_loss", "val_acc", *params, "best epoch", "seconds"]
    rows = [
        [
            str(trial.number),
            f"{trial.value:.4f}",
            f"{trial.user_attrs['val_acc']:.4f}",
            *(format_value(trial.params[name]) if name in trial.params else "-" for name in params),
            str(trial.user_attrs["best_epoch"]),
            f"{trial.duration.total_seconds():.1f}",
        ]
        for trial in trials
    ]
    return header, rows


def top_trials_table(study: optuna.Study, n: int = 10) -> str:
    """The best trials as aligned text, for the console."""
    header, rows = table_rows(top_trials(study, n))
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
    study: optuna.Study, tracker: Tracker, parent_run_id: str, experiment, options
) -> Tested | None:
    """Evaluate the best trial's best-epoch weights on the test set, once, and log them, with
    the model, on the parent run. The test set plays no part in choosing the trial."""
    from tunetrack.machinery.training.fit import CHECKPOINT_ARTIFACT, evaluate_on_test, load_weights

    best = best_trial(study)
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
    test = evaluate_on_test(model, data, options.accelerator)
    tracker.log_datasets(parent_run_id, [split for split in data.describe() if split.context == "test"])
    tracker.log_metrics(parent_run_id, test, step=len(study.trials))
    tracker.set_tags(parent_run_id, {"tested_trial": best.number, "tested_run_id": run_id})
    model_id = registry.log_model(tracker, parent_run_id, model, data, settings.task, experiment.datasets)
    return Tested(best, test, model_id, data.describe(), data)


def judge_on(experiment, data, accelerator: str, tracker: Tracker) -> Callable[[dict[str, str]], float | None]:
    """How a registered version does on ``data``'s validation split: its val_loss, measured by the
    experiment's own module, built from the settings its tags hold and given the weights of the
    checkpoint of the run its tags name. None where that cannot be had: a version registered
    without them, a run whose artifacts are gone, a model for inputs of another shape."""
    from tunetrack.machinery.study.retraining import typed
    from tunetrack.machinery.training.fit import CHECKPOINT_ARTIFACT, evaluate, load_weights

    def judge(tags: dict[str, str]) -> float | None:
        settings = typed(experiment.settings_class, tags)
        if "run_id" not in tags or not settings:
            return None
        try:
            model, _ = experiment.build(settings_of(experiment.settings_class, settings))
            with tempfile.TemporaryDirectory() as tmp:
                load_weights(model, tracker.download_artifact(tags["run_id"], str(CHECKPOINT_ARTIFACT), tmp))
            return evaluate(model, data, accelerator, "val")["val_loss"]
        except Exception:  # noqa: BLE001 - whatever stands in the way, the version cannot be measured here
            return None

    return judge


def settings_of(settings_class: type, recorded: dict):
    """The settings a trial recorded, as ``settings_class``: a field it did not know takes its
    default, and one that is gone is left out."""
    names = {field.name for field in dataclasses.fields(settings_class)}
    return settings_class(**{name: value for name, value in recorded.items() if name in names})


def log_study_summary(study: optuna.Study, tracker: Tracker, parent_run_id: str) -> None:
    """Best params and value, trial counts, all trials as CSV and Optuna's plots, on the parent run."""
    import matplotlib.pyplot as plt

    from tunetrack.machinery.study.plots import study_figures

    step = len(study.trials)
    tracker.log_metrics(parent_run_id, {f"n_{state.lower()}": n for state, n in counts(study).items()}, step=step)
    best = best_trial(study)
    if best is not None:
        tracker.log_metrics(
            parent_run_id, {"best_val_loss": best.value, "best_val_acc": best.user_attrs["val_acc"]}, step=step
        )
        tracker.set_tags(parent_run_id, {"best_trial": best.number, **{f"best.{k}": v for k, v in best.params.items()}})
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "trials.csv"
        study.trials_dataframe().to_csv(csv, index=False)
        tracker.log_artifact(parent_run_id, csv)
        if best is not None:
            for name, figure in study_figures(study).items():
                figure.savefig(Path(tmp) / name, dpi=100, bbox_inches="tight")
                plt.close(figure)
                tracker.log_artifact(parent_run_id, Path(tmp) / name, "plots")
