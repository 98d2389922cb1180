"""Figures of a study, for its parent run's artifacts (and the README's): Optuna's own plots
with axes that say what they show."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

OBJECTIVE = "val_loss at the best epoch\n(log scale)"
SIZE = (10, 4.5)


def study_figures(study: optuna.Study) -> dict[str, plt.Figure]:
    """Optimization history, parameter importances and slice plots, by file name.

    Importances need two finished trials that differ; with fewer, that figure is left out.
    """
    figures = {}
    with warnings.catch_warnings():
        # Optuna's matplotlib plots are "experimental"; small studies add notes of their own.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        history = optuna_plots.plot_optimization_history(study)
        history.set(xlabel="trial number", ylabel=OBJECTIVE, yscale="log")
        _retitle(history, f"Optimization history: {len(study.trials)} trials (the complete ones shown)")
        history.legend(["a complete trial", "the best so far"], loc="upper right")
        figures["optimization_history.png"] = history.figure

        try:
            importances = optuna_plots.plot_param_importances(study)
        except (RuntimeError, ValueError, ZeroDivisionError):
            pass
        else:
            importances.set_xlabel("importance for reaching the best val_loss (they sum to 1)")
            _retitle(importances, "Hyperparameter importances (Optuna's PED-ANOVA)")
            importances.get_legend().remove()
            figures["param_importances.png"] = importances.figure

        slices = optuna_plots.plot_slice(study)
        axes = list(slices.flat) if hasattr(slices, "flat") else [slices]
        for ax in axes:
            ax.set_yscale("log")
        axes[0].set_ylabel(OBJECTIVE)
        axes[0].figure.suptitle("val_loss against each hyperparameter (colour: trial number)")
        figures["slice.png"] = axes[0].figure
    for figure in figures.values():
        figure.set_size_inches(*SIZE)
    return figures


def _retitle(ax, title: str) -> None:
    for loc in ("center", "right"):  # Optuna puts its own titles in either place
        ax.set_title("", loc=loc)
    ax.set_title(title, loc="left")
