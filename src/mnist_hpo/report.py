"""The README's results, from a finished study: figures into img/, and markdown tables (the top
trials, and the trials grouped by each hyperparameter) between markers in the README."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import matplotlib.pyplot as plt
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from mnist_hpo.plots import learning_curves, study_figures
from mnist_hpo.results import top_trials

# How the trials are grouped, per hyperparameter: (label, low, high) with low <= value < high.
GROUPS = {
    "batch_size": [(str(size), size, size + 1) for size in (32, 64, 128, 256)],
    "hidden_dim": [("32-127", 32, 128), ("128-255", 128, 256), ("256-383", 256, 384), ("384-512", 384, 513)],
    "lr": [
        ("1e-4 to 3e-4", 1e-4, 3e-4),
        ("3e-4 to 1e-3", 3e-4, 1e-3),
        ("1e-3 to 1e-2", 1e-3, 1e-2),
        ("1e-2 to 1e-1", 1e-2, 0.11),
    ],
}


def write_figures(study: optuna.Study, client: MlflowClient, out_dir: Path, n_curves: int = 3) -> list[Path]:
    """Optuna's plots and the learning curves of the ``n_curves`` best trials, as PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = study_figures(study)
    best = top_trials(study, n_curves)
    curves = [(f"trial {row['trial']}", _history(client, row["run_id"])) for row in best]
    figures["learning_curves.png"] = learning_curves(curves)
    written = []
    for name, figure in figures.items():
        figure.savefig(out_dir / name, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(out_dir / name)
    return written


def _history(client: MlflowClient, run_id: str) -> dict[str, list[float]]:
    return {
        name: [m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]
        for name in ("train_loss", "val_loss")
    }


def top_trials_markdown(study: optuna.Study, n: int = 10) -> str:
    lines = [
        "| trial | val_loss | val_acc | batch_size | hidden_dim | lr | best epoch | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in top_trials(study, n):
        lines.append(
            f"| {row['trial']} | {row['val_loss']:.4f} | {row['val_acc']:.4f} | {row['batch_size']} | "
            f"{row['hidden_dim']} | {row['lr']:.2e} | {row['best_epoch']} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def groups_markdown(study: optuna.Study, param: str) -> str:
    """The trials grouped by one hyperparameter: how many finished, were pruned, and how well."""
    lines = [
        f"| {param} | trials | complete | pruned | failed | best val_loss | median val_loss | best val_acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, low, high in GROUPS[param]:
        trials = [t for t in study.trials if param in t.params and low <= t.params[param] < high]
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        count = {state: sum(t.state == state for t in trials) for state in TrialState}
        losses = [t.value for t in complete]
        lines.append(
            f"| {label} | {len(trials)} | {count[TrialState.COMPLETE]} | {count[TrialState.PRUNED]} | "
            f"{count[TrialState.FAIL]} | {_fmt(min(losses, default=math.nan))} | "
            f"{_fmt(statistics.median(losses) if losses else math.nan)} | "
            f"{_fmt(max((_val_acc(t) for t in complete), default=math.nan))} |"
        )
    return "\n".join(lines)


def _val_acc(trial: FrozenTrial) -> float:
    return trial.user_attrs["val_acc"]


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    """Put each block between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in ``text``."""
    for name, block in blocks.items():
        pattern = re.compile(rf"(<!-- report:{re.escape(name)} -->\n).*?(<!-- /report:{re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"the README has no <!-- report:{name} --> ... <!-- /report:{name} --> markers")
        body = block.rstrip("\n") + "\n"
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text
