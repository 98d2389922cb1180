"""Which sampler and pruner find the most per minute: studies of the same experiment, each for
the same wall-clock budget, with each method and several seeds (see scripts/compare_search.py).

The machine is shared and its speed drifts, so the studies run seed by seed, each seed's
methods in an order rotated from the last seed's; never one method's seeds all together.
Every trial's finish time (from the study's start, worker start-up included, as a user's
clock counts it) and result is kept; from them, per method and over the seeds:

- the anytime curve: the best val_loss of the trials finished by each moment;
- the time to target: when the first trial with val_acc at or above the target finished;
- the best val_loss at the budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tunetrack.experiment.search import EXPERIMENT
from tunetrack.machinery.options import TuneOptions
from tunetrack.machinery.study.studies import metrics_of
from tunetrack.machinery.study.tuning import tune
from tunetrack.machinery.tracking.mlflow_runs import connect

# Method: (sampler, pruner). TPE with median pruning is what tune.py did before the comparison.
METHODS = {
    "tpe+median": ("tpe", "median"),
    "tpe+hyperband": ("tpe", "hyperband"),
    "tpe+halving": ("tpe", "halving"),
    "gp+median": ("gp", "median"),
    "gp+hyperband": ("gp", "hyperband"),
    "random+median": ("random", "median"),
}
BASELINE = "random+median"


def run_study(settings, method: str, seed: int, budget: float, workers: int, experiment=EXPERIMENT,
              defaults_first: bool = False) -> dict:  # fmt: skip
    """One study of ``method`` from ``seed`` for ``budget`` seconds on throwaway stores: every
    trial's state, value, val_acc and finish time (seconds from the start). Its first trial is
    the sampler's, random, as every method's is, unless ``defaults_first``."""
    sampler, pruner = METHODS[method]
    settings = dataclasses.replace(settings, seed=seed)
    with tempfile.TemporaryDirectory(prefix="search-") as folder:
        options = TuneOptions(
            n_trials=100_000, workers=workers, sampler=sampler, pruner=pruner, study_name=f"{method} {seed}",
            storage=f"sqlite:///{folder}/optuna.db", accelerator="cpu", repeats=0, baseline="none",
            defaults_first=defaults_first,
        ).resolved(settings)  # fmt: skip
        options = dataclasses.replace(options, registered_model="")
        started = time.time()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            outcome = tune(
                experiment,
                settings,
                options,
                lambda: connect(f"sqlite:///{folder}/mlflow.db", "search"),
                started + budget,
            )
        trials = [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "val_acc": metrics_of(t).get("val_acc"),
                "finished_s": t.datetime_complete.timestamp() - started if t.datetime_complete else None,
                "params": t.params,
            }
            for t in outcome.study.trials
        ]
    return {"method": method, "seed": seed, "budget": budget, "workers": workers, "trials": trials}


def compare(
    settings,
    methods: Sequence[str],
    seeds: Sequence[int],
    budget: float,
    workers: int,
    done: Callable[[dict], None] = lambda study: None,
    experiment=EXPERIMENT,
) -> list[dict]:
    """Every method's study for every seed, seed by seed, each seed's methods in an order rotated
    by one from the last seed's; ``done`` is handed each study as it ends. The experiment is
    the repository's unless another is given."""
    studies = []
    for i, seed in enumerate(seeds):
        order = list(methods[i % len(methods) :]) + list(methods[: i % len(methods)])
        for position, method in enumerate(order):
            study = {**run_study(settings, method, seed, budget, workers, experiment), "position": position}
            studies.append(study)
            done(study)
    return studies


def best_by(trials: list[dict], seconds: float) -> float:
    """The best val_loss of the complete trials finished by ``seconds``; inf if none had."""
    values = [t["value"] for t in trials if t["state"] == "COMPLETE" and t["finished_s"] <= seconds]
    return min(values, default=math.inf)


def time_to_target(trials: list[dict], target: float, budget: float) -> float:
    """When the first complete trial with val_acc >= ``target`` finished; inf if none did in time."""
    hits = [t["finished_s"] for t in trials if t["state"] == "COMPLETE" and t["val_acc"] >= target]
    return min((s for s in hits if s <= budget), default=math.inf)


def summarize(studies: list[dict], target: float) -> dict[str, dict]:
    """Per method: the seeds' times to target and best val_loss at the budget, their medians
    and spreads (lowest to highest), and the speed-up over random search on the median time to
    target. A median of more than half infinite times is infinite: not reached."""
    table = {}
    for method in dict.fromkeys(s["method"] for s in studies):
        mine = [s for s in studies if s["method"] == method]
        times = [time_to_target(s["trials"], target, s["budget"]) for s in mine]
        best = [best_by(s["trials"], s["budget"]) for s in mine]
        table[method] = {
            "seeds": [s["seed"] for s in mine],
            "time_to_target": times,
            "median_time_to_target": statistics.median(times),
            "reached": sum(math.isfinite(t) for t in times),
            "best_at_budget": best,
            "median_best_at_budget": statistics.median(best),
            "trials": statistics.median(len(s["trials"]) for s in mine),
        }
    baseline = table.get(BASELINE, {}).get("median_time_to_target")
    for row in table.values():
        ratio = baseline / row["median_time_to_target"] if baseline is not None else math.nan
        row["speedup_over_random"] = ratio if math.isfinite(ratio) else None
    return table


def table_markdown(table: dict[str, dict], target: float) -> str:
    """The summary as a markdown table: median and spread of each figure, per method."""

    def seconds(values: list[float], median: float) -> str:
        if not math.isfinite(median):
            return f"not reached ({sum(map(math.isfinite, values))} of {len(values)} seeds did)"
        finite = [v for v in values if math.isfinite(v)]
        high = "not reached" if len(finite) < len(values) else f"{max(values):.0f}"
        return f"{median:.0f} s ({min(finite):.0f} to {high})"

    rows = [
        f"| method | median time to val_acc >= {target} (spread) | best val_loss at the budget, median (spread) "
        "| speed-up over random | trials |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, row in table.items():
        best = row["best_at_budget"]
        speedup = row["speedup_over_random"]
        rows.append(
            f"| {method} | {seconds(row['time_to_target'], row['median_time_to_target'])} "
            f"| {row['median_best_at_budget']:.4f} ({min(best):.4f} to {max(best):.4f}) "
            f"| {'-' if speedup is None else f'{speedup:.2f}x'} | {row['trials']:.0f} |"
        )
    return "\n".join(rows)


def anytime_figure(studies: list[dict], path: Path, points: int = 200) -> None:
    """img/search.png: per method, the median over seeds of the best val_loss found by each
    moment, with the lowest and highest of the seeds as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    budget = max(s["budget"] for s in studies)
    grid = np.linspace(0, budget, points)
    figure, ax = plt.subplots(figsize=(10, 5))
    for method in dict.fromkeys(s["method"] for s in studies):
        curves = np.array([[best_by(s["trials"], t) for t in grid] for s in studies if s["method"] == method])
        median = np.median(curves, axis=0)
        (line,) = ax.plot(grid, np.where(np.isfinite(median), median, np.nan), label=method)
        low, high = curves.min(axis=0), curves.max(axis=0)
        shown = np.isfinite(high)
        ax.fill_between(grid[shown], low[shown], high[shown], color=line.get_color(), alpha=0.12)
    seeds = len({s["seed"] for s in studies})
    ax.set(
        title=f"Best val_loss found so far: median of {seeds} seeds, band from the lowest to the highest",
        xlabel=f"seconds since the study started (worker start-up included; budget {budget:.0f} s)",
        ylabel="best val_loss (log scale)",
    )
    if any(best_by(s["trials"], budget) < math.inf for s in studies):
        ax.set_yscale("log")
    else:  # A log axis of nothing cannot be drawn; say why the picture is empty instead.
        ax.text(0.5, 0.5, "no trial finished within the budget", transform=ax.transAxes, ha="center")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save(studies: list[dict], path: Path) -> None:
    path.write_text(json.dumps(studies, indent=1, default=str))
