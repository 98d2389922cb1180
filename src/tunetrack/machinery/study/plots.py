"""Figures of a study, for its parent run's artifacts (and the README's): Optuna's own plots
with axes that say what they show, each named after the metric the study optimizes."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from tunetrack.machinery.objectives import MINIMIZE, Objective  # noqa: E402

SIZE = (10, 4.5)


def study_figures(study: optuna.Study, objective: Objective) -> dict[str, plt.Figure]:
    """Optimization history, parameter importances and slice plots of the objective (the first,
    in a study of two, beside its Pareto front), by file name.

    Importances need two finished trials that differ; with fewer, that figure is left out.
    """
    name = objective.first
    values = [t.values[0] for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    # A loss spans decades, and reads on a log scale; an accuracy does not.
    log = objective.directions[0] == MINIMIZE and all(v > 0 for v in values)
    label = f"{name} at the best epoch" + ("\n(log scale)" if log else "")
    target = {"target": lambda trial: trial.values[0], "target_name": name} if objective.several else {}
    figures = {}
    with warnings.catch_warnings():
        # Optuna's matplotlib plots are "experimental"; small studies add notes of their own.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        history = optuna_plots.plot_optimization_history(study, **target)
        history.set(xlabel="trial number", ylabel=label, yscale="log" if log else "linear")
        _retitle(history, f"Optimization history: {len(study.trials)} trials (the complete ones shown)")
        history.legend(["a complete trial", "the best so far"], loc="best")
        figures["optimization_history.png"] = history.figure

        try:
            importances = optuna_plots.plot_param_importances(study, **target)
        except (RuntimeError, ValueError, ZeroDivisionError):
            pass
        else:
            importances.set_xlabel(f"importance for reaching the best {name} (they sum to 1)")
            _retitle(importances, "Hyperparameter importances (Optuna's PED-ANOVA)")
            if importances.get_legend() is not None:
                importances.get_legend().remove()
            figures["param_importances.png"] = importances.figure

        slices = optuna_plots.plot_slice(study, **target)
        axes = list(slices.flat) if hasattr(slices, "flat") else [slices]
        for ax in axes:
            ax.set_yscale("log" if log else "linear")
        axes[0].set_ylabel(label)
        axes[0].figure.suptitle(f"{name} against each hyperparameter (colour: trial number)")
        figures["slice.png"] = axes[0].figure

        if objective.several:
            front = optuna_plots.plot_pareto_front(study)
            front.set(xlabel=f"{objective.names[0]} ({objective.directions[0]})",
                      ylabel=f"{objective.names[1]} ({objective.directions[1]})")  # fmt: skip
            _retitle(front, "Pareto front: no trial on it is beaten on both objectives")
            figures["pareto_front.png"] = front.figure
    for figure in figures.values():
        figure.set_size_inches(*SIZE)
    return figures


def _retitle(ax, title: str) -> None:
    for loc in ("center", "right"):  # Optuna puts its own titles in either place
        ax.set_title("", loc=loc)
    ax.set_title(title, loc="left")
