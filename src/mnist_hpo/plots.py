"""Figures of a study, as matplotlib figures: the parent run's artifacts and the README's pictures."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402


def _figure_of(axes) -> plt.Figure:
    return (axes.flat[0] if hasattr(axes, "flat") else axes).figure


def study_figures(study: optuna.Study) -> dict[str, plt.Figure]:
    """Optuna's optimization history, parameter importances and slice plot, by file name.

    Importances need two finished trials that differ; with fewer, that figure is left out.
    """
    figures = {}
    with warnings.catch_warnings():
        # Experimental API, and notes on small studies (equal importances, one-point axes).
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        figures["optimization_history.png"] = _figure_of(optuna_plots.plot_optimization_history(study))
        try:
            figures["param_importances.png"] = _figure_of(optuna_plots.plot_param_importances(study))
        except (RuntimeError, ValueError, ZeroDivisionError):
            pass
        figures["slice.png"] = _figure_of(optuna_plots.plot_slice(study))
    for figure in figures.values():
        figure.set_size_inches(10, 5)
    return figures
