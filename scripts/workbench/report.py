"""The README's results, from a finished study: figures into img/, and markdown tables (the top
trials, and the trials grouped by each hyperparameter) between markers in a markdown file.

The groups come from each parameter's distribution in the study: one group per choice of a
categorical parameter, and four equal bins (on a log scale where the search was) over the
range of a numeric one. Every trial with the parameter falls in exactly one group.
"""

from __future__ import annotations

import bisect
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from tunetrack.machinery.objectives import sort_key
from tunetrack.machinery.study.plots import SIZE, study_figures
from tunetrack.machinery.study.results import param_names, table_rows, top_trials
from tunetrack.machinery.study.space import format_value
from tunetrack.machinery.study.studies import RUN_ATTR, metrics_of, objective_of
from tunetrack.machinery.tracking.mlflow_runs import Tracker

BINS = 4
CURVES = ("train_loss", "val_loss")


def write_figures(study: optuna.Study, tracker: Tracker, out_dir: Path, n_curves: int = 3) -> list[Path]:
    """Optuna's plots and the learning curves of the ``n_curves`` best trials, as PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = study_figures(study, objective_of(study))
    curves = [
        (f"trial {t.number}", {name: tracker.metric_history(t.user_attrs[RUN_ATTR], name) for name in CURVES})
        for t in top_trials(study, n_curves)
    ]
    figures["learning_curves.png"] = learning_curves(curves)
    written = []
    for name, figure in figures.items():
        figure.savefig(out_dir / name, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(out_dir / name)
    return written


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> str:
    """``align`` holds one character per column: ``l`` or ``r``."""
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return "\n".join([_row(header), rule, *map(_row, rows)])


def _row(cells: list[str]) -> str:
    return f"| {' | '.join(cells)} |"


def top_trials_markdown(study: optuna.Study, n: int = 10) -> str:
    header, rows = table_rows(top_trials(study, n), objective_of(study))
    return markdown_table(header, rows, "r" * len(header))


def searched_params(study: optuna.Study) -> dict[str, BaseDistribution]:
    """Each parameter of the study with its distribution (as the latest trial that has it saw it)."""
    trials = study.get_trials(deepcopy=False)
    return {
        name: next(t.distributions[name] for t in reversed(trials) if name in t.distributions)
        for name in param_names(trials)
    }


def groups_markdown(study: optuna.Study, param: str) -> str:
    """The trials grouped by one hyperparameter: how many finished, were pruned, and how well (by
    the study's objective, and the best val_acc)."""
    objective = objective_of(study)
    metric, key = objective.first, sort_key(objective.directions[0])
    labels, group_of = groups(searched_params(study)[param])
    members: list[list[FrozenTrial]] = [[] for _ in labels]
    for trial in study.get_trials(deepcopy=False):
        if param in trial.params:
            members[group_of(trial.params[param])].append(trial)
    rows = []
    for label, trials in zip(labels, members, strict=True):
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        count = {state: sum(t.state == state for t in trials) for state in TrialState}
        values = sorted((t.values[0] for t in complete), key=key)
        rows.append([
            label,
            str(len(trials)),
            str(count[TrialState.COMPLETE]),
            str(count[TrialState.PRUNED]),
            str(count[TrialState.FAIL]),
            _fmt(values[0] if values else math.nan),
            _fmt(statistics.median(values) if values else math.nan),
            _fmt(max((metrics_of(t).get("val_acc", math.nan) for t in complete), default=math.nan)),
        ])  # fmt: skip
    header = [param, "trials", "complete", "pruned", "failed", f"best {metric}", f"median {metric}", "best val_acc"]
    return markdown_table(header, rows, "l" + "r" * 7)


def groups(distribution: BaseDistribution):
    """The group labels of a parameter, and a function from a value to its group's index."""
    if isinstance(distribution, CategoricalDistribution):
        choices = list(distribution.choices)
        return [format_value(c) for c in choices], choices.index
    low, high = distribution.low, distribution.high
    space = np.geomspace if distribution.log else np.linspace
    if isinstance(distribution, IntDistribution):
        inner = sorted({math.floor(e) for e in space(low, high + 1, BINS + 1)[1:-1]})
        edges = [low, *inner, high + 1]  # group i holds edges[i] <= value < edges[i + 1]
        labels = [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:], strict=False)]
    else:
        edges = [float(e) for e in space(low, high, BINS + 1)]
        labels = [f"{a:.2g} to {b:.2g}" for a, b in zip(edges, edges[1:], strict=False)]
    last = len(labels) - 1
    # Values outside the range (a space that was later narrowed) go to the nearest group.
    return labels, lambda value: min(max(bisect.bisect_right(edges, value) - 1, 0), last)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    """Put each block between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in ``text``,
    a markdown page's."""
    for name, block in blocks.items():
        pattern = re.compile(rf"(<!-- report:{re.escape(name)} -->\n).*?(<!-- /report:{re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"the page has no <!-- report:{name} --> ... <!-- /report:{name} --> markers")
        body = block.rstrip("\n") + "\n"
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def learning_curves(curves: Sequence[tuple[str, Mapping[str, Sequence[float]]]]) -> plt.Figure:
    """train_loss and val_loss per epoch, one colour per run: ``[(label, {metric: values})]``."""
    figure, ax = plt.subplots(figsize=SIZE)
    for (label, metrics), color in zip(curves, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
        ax.plot(metrics["val_loss"], color=color, marker="o", label=f"{label}: val_loss")
        ax.plot(metrics["train_loss"], color=color, linestyle="--", label=f"{label}: train_loss")
    ax.set(
        title="Training and validation loss of the best trials",
        xlabel="epoch",
        ylabel="loss (log scale)",
        yscale="log",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    figure.tight_layout()
    return figure
