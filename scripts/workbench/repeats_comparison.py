"""What repeating the best trials buys on a small data set, and what it costs (see
scripts/compare_repeats.py).

For each seed, one study of a folder of pictures with the best ``top`` trials each trained
``most`` times more (tune.py --repeats), every run kept; then, for each R up to ``most``, the
trial that R repeats would choose (the best mean of its first R + 1 values), its standard error,
and how the chosen trial's weights do on the test split, which plays no part in any choice. A
repeat costs what a trial that ran all its epochs costs; the cost of R is R x ``top`` of them,
against the study's own wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

from tunetrack.experiment.search import EXPERIMENT
from tunetrack.experiment.settings import Settings
from tunetrack.machinery.options import TuneOptions
from tunetrack.machinery.study import results
from tunetrack.machinery.study.repeats import REPEATS_ATTR
from tunetrack.machinery.study.studies import RUN_ATTR, SETTINGS_ATTR
from tunetrack.machinery.study.tuning import tune
from tunetrack.machinery.study.workers import default_workers
from tunetrack.machinery.tracking.mlflow_runs import connect
from tunetrack.machinery.training.fit import CHECKPOINT_ARTIFACT, evaluate, load_weights


def one_study(folder: Path, seed: int, trials: int, top: int, most: int, objective: str) -> dict:
    """A study of ``trials`` trials with its best ``top`` repeated ``most`` times: the wall time of
    its trials, a repeat's seconds, and for each of the best, its values (its own first) and its
    weights' test accuracy."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)  # MLflow's artifacts go beside its store
        settings = Settings(dataset="folder", data_dir=str(folder), seed=seed)
        tracker = connect(f"sqlite:///{work}/mlflow.db", "repeats")
        options = TuneOptions(n_trials=trials, workers=default_workers(), storage=f"sqlite:///{work}/optuna.db",
                              study_name="repeats",
                              objective=objective, repeats=most, repeat_best=top, baseline="none",
                              registered_model="", accelerator="cpu").resolved(settings)  # fmt: skip
        options = dataclasses.replace(options, registered_model="").aimed(EXPERIMENT)
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            outcome = tune(EXPERIMENT, settings, options, lambda: tracker)
        wall = time.perf_counter() - started
        study = outcome.study
        kept = study.user_attrs[REPEATS_ATTR]
        candidates = []
        for trial in results.complete_trials(study)[:top]:
            recorded = results.settings_of(Settings, trial.user_attrs[SETTINGS_ATTR])
            model, data = EXPERIMENT.build(recorded)
            load_weights(model, tracker.download_artifact(trial.user_attrs[RUN_ATTR], str(CHECKPOINT_ARTIFACT), work))
            test = evaluate(model, data, "cpu", "test")
            candidates.append({"trial": trial.number, "values": [trial.values[0], *kept[str(trial.number)]],
                               "test_acc": test["test_acc"]})  # fmt: skip
        repeat_runs = [r for r in tracker.runs_tagged("optuna.study", "repeats") if "repeat_of" in r.data.tags]
        seconds = [(r.info.end_time - r.info.start_time) / 1000 for r in repeat_runs]
        os.chdir(here)
        # The repeats run one after another once the trials are done: the rest is the study's own.
        return {"seed": seed, "wall": wall - sum(seconds), "repeat_seconds": statistics.fmean(seconds),
                "candidates": candidates, "direction": options.goal.directions[0]}  # fmt: skip


def by_repeats(study: dict, repeats: int) -> dict:
    """What ``repeats`` repeats would have chosen in ``study``."""
    sign = 1 if study["direction"] == "minimize" else -1
    scored = []
    for c in study["candidates"]:
        values = c["values"][: repeats + 1]
        sem = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
        scored.append((sign * statistics.fmean(values), c["trial"], statistics.fmean(values), sem, c["test_acc"]))
    _, trial, mean, sem, test_acc = min(scored)
    return {"trial": trial, "mean": mean, "sem": sem, "test_acc": test_acc}


def table(studies: list[dict], most: int, top: int) -> str:
    """Per R: what the repeats cost, how often the choice differs from R = 0's, the standard error
    of the chosen mean, and the chosen weights' test accuracy: medians, and the mean for the test
    accuracy, over the seeds."""
    lines = [
        "| R (--repeats) | runs added | their cost: seconds, share of the study | choice differs from R = 0 | "
        "standard error of the chosen mean | test_acc of the chosen, mean |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for repeats in range(most + 1):
        chosen = [by_repeats(s, repeats) for s in studies]
        plain = [by_repeats(s, 0) for s in studies]
        seconds = [repeats * top * s["repeat_seconds"] for s in studies]
        share = [cost / s["wall"] for cost, s in zip(seconds, studies, strict=True)]
        differs = sum(a["trial"] != b["trial"] for a, b in zip(chosen, plain, strict=True))
        lines.append(
            f"| {repeats} | {repeats * top} | {statistics.median(seconds):.1f} s, {statistics.median(share):.0%} | "
            f"{differs} of {len(studies)} | {_number(statistics.median(c['sem'] for c in chosen))} | "
            f"{statistics.fmean(c['test_acc'] for c in chosen):.4f} |"
        )
    return "\n".join(lines)


def _number(value: float) -> str:
    return "-" if value != value else f"{value:.4f}"
