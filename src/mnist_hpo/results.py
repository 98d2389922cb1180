"""What a study session leaves behind: the best trial tested once, its model, and the parent
run's summary (best params, a CSV of all trials, Optuna's plots)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_hpo.tracking import Tracker, log_torch_model


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda trial: trial.value) if complete else None


def counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {state.name: sum(t.state == state for t in trials) for state in TrialState}


def top_trials(study: optuna.Study, n: int = 10) -> list[dict]:
    """The ``n`` best complete trials, best first: their scores, params and MLflow run."""
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    return [
        {
            "trial": trial.number,
            "val_loss": trial.value,
            "val_acc": trial.user_attrs["val_acc"],
            **trial.params,
            "best_epoch": trial.user_attrs["best_epoch"],
            "seconds": trial.duration.total_seconds(),
            "run_id": trial.user_attrs["mlflow_run_id"],
        }
        for trial in complete[:n]
    ]


def top_trials_table(study: optuna.Study, n: int = 10) -> str:
    rows = [
        f"{'trial':>5}  {'val_loss':>8}  {'val_acc':>7}  {'batch_size':>10}  {'hidden_dim':>10}  {'lr':>8}  seconds"
    ]
    for row in top_trials(study, n):
        rows.append(
            f"{row['trial']:>5}  {row['val_loss']:>8.4f}  {row['val_acc']:>7.4f}  {row['batch_size']:>10}  "
            f"{row['hidden_dim']:>10}  {row['lr']:>8.2e}  {row['seconds']:>7.1f}"
        )
    return "\n".join(rows)


def evaluate_best_trial(
    study: optuna.Study, tracker: Tracker, parent_run_id: str, data_dir: str, accelerator: str
) -> dict[str, float] | None:
    """Evaluate the best trial's best-epoch weights on the test set, once, and log them, with
    the model, on the parent run. The test set plays no part in choosing the trial."""
    from mnist_hpo.data import MNIST_MEAN, MNIST_STD, MNISTDataModule
    from mnist_hpo.model import LitClassifier, pixel_classifier
    from mnist_hpo.training import CHECKPOINT_ARTIFACT, evaluate_on_test

    best = best_trial(study)
    if best is None:
        return None
    run_id = best.user_attrs["mlflow_run_id"]
    with tempfile.TemporaryDirectory() as tmp:
        path = tracker.client.download_artifacts(run_id, str(CHECKPOINT_ARTIFACT), tmp)
        model = LitClassifier.load_from_checkpoint(path, map_location="cpu")
    val_size = int(tracker.client.get_run(run_id).data.params["val_size"])
    test = evaluate_on_test(model, data_dir, val_size, accelerator)
    tracker.log_metrics(parent_run_id, test, step=len(study.trials))
    tracker.set_tags(parent_run_id, {"tested_trial": best.number, "tested_run_id": run_id})

    # The input example: five test digits as the exported model takes them, pixels in [0, 1].
    data = MNISTDataModule(data_dir, val_size=val_size)
    data.setup("test")
    pixels = data.splits.test_images[:5].cpu() * MNIST_STD + MNIST_MEAN
    log_torch_model(tracker, parent_run_id, pixel_classifier(model), pixels.numpy())
    return test


def log_study_summary(study: optuna.Study, tracker: Tracker, parent_run_id: str) -> None:
    """Best params and value, trial counts, all trials as CSV and Optuna's plots, on the parent run."""
    import matplotlib.pyplot as plt

    from mnist_hpo.plots import study_figures

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
        tracker.client.log_artifact(parent_run_id, str(csv))
        if best is not None:
            for name, figure in study_figures(study).items():
                figure.savefig(Path(tmp) / name, dpi=100, bbox_inches="tight")
                plt.close(figure)
                tracker.client.log_artifact(parent_run_id, str(Path(tmp) / name), artifact_path="plots")
