"""train.py and the training function behind it: one run, tracked; the experiment's Trainer
arguments; a run that stops early; a trial or a run trained again; a model registered."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.callbacks import LearningRateMonitor

from conftest import TINY, TINY_TEST, TINY_VAL
from tiny import experiment as tiny
from tiny.settings import TinySettings
from tunetrack.machinery.options import Options
from tunetrack.machinery.tracking.mlflow_runs import connect
from tunetrack.machinery.training.fit import TrackedRun, fit, load_weights

EPOCHS = 3


@pytest.mark.slow
def test_train_script_tracks_one_finished_run(run_script, tiny_data, tmp_path):
    result = run_script(
        "train.py", "--lr", "0.03", "--width", "12", "--batch-size", "50", "--max-epochs", str(EPOCHS),
        "--data-dir", str(tiny_data), "--experiment", "e2e",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "blocks: using the files in" in result.stdout
    assert "look at it: mlflow ui   then" in result.stdout  # the default store: no flags needed

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id in result.stdout
    params = run.data.params
    assert {k: params[k] for k in ("dataset", "model", "lr", "width", "batch_size", "max_epochs", "seed")} == {
        "dataset": "blocks", "model": "dense", "lr": "0.03", "width": "12", "batch_size": "50",
        "max_epochs": str(EPOCHS), "seed": "0",
    }  # fmt: skip
    assert params["val_size"] == str(TINY_VAL) and params["data_source"] == "existing files"
    for name in ("train_loss", "val_loss", "val_acc"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == list(range(EPOCHS)), name
    val_loss = [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert run.data.metrics["best_val_loss"] == min(val_loss) and run.data.metrics["epochs"] == EPOCHS
    assert val_loss[-1] < val_loss[0]  # it learned
    # The test metrics are those of the best epoch's weights, as logged in its checkpoint.
    checkpoint = client.download_artifacts(run.info.run_id, "checkpoints/best.ckpt", str(tmp_path))
    settings = TinySettings(lr=0.03, width=12, batch_size=50, max_epochs=EPOCHS)
    model = load_weights(tiny.build(settings)[0], checkpoint).eval()
    images, labels = tiny.pictures(TINY_TEST, seed=1, pattern=tiny.PATTERNS["blocks"])
    with torch.no_grad():
        predicted = model(torch.from_numpy(images).float().unsqueeze(1) / 255).argmax(dim=1)
    accuracy = (predicted == torch.from_numpy(labels).long()).float().mean().item()
    assert run.data.metrics["test_acc"] == pytest.approx(accuracy, abs=1e-6)
    assert accuracy > 0.5  # four classes: chance is 0.25
    assert f"test_acc {accuracy:.4f}" in result.stdout
    [checkpoints] = client.list_artifacts(run.info.run_id)
    assert [a.path for a in client.list_artifacts(run.info.run_id, checkpoints.path)] == ["checkpoints/best.ckpt"]


def fit_here(settings, tracker, name: str = "run", **more):
    with tracker.run(name) as run_id:
        model, data = tiny.build(settings)
        arguments = more.pop("trainer_arguments", None)
        own = TINY.trainer if arguments is None else (lambda settings: arguments)
        run = TrackedRun(tracker, run_id, Options(accelerator="cpu"), own, progress_bar=False, **more)
        return fit(model, data, settings, run)


def test_the_same_seed_gives_the_same_metrics(tiny_settings, tracking_uri):
    tracker = connect(tracking_uri, "seeds")
    settings = dataclasses.replace(tiny_settings, lr=0.03, width=16, batch_size=32, seed=7)
    first, second = fit_here(settings, tracker), fit_here(settings, tracker)
    scores = [{k: v for k, v in {**r.metrics, **r.test}.items() if k != "latency_ms"} for r in (first, second)]
    assert scores[0] == scores[1] and {"val_loss", "val_acc", "params", "test_acc"} <= set(scores[0])
    history = [tracker.metric_history(r.run_id, "train_loss") for r in (first, second)]
    assert history[0] == history[1]
    other = fit_here(dataclasses.replace(settings, seed=8), tracker)
    assert other.metrics["val_loss"] != first.metrics["val_loss"]


def test_every_data_set_and_network_trains_through_the_same_script(call_script, tiny_data, tmp_path):
    for args in (["--model", "conv"], ["--dataset", "stripes"], ["--dataset", "stripes", "--model", "conv"]):
        result = call_script("train.py", *args, "--max-epochs", "3", "--lr", "0.05", "--data-dir", str(tiny_data))
        assert result.returncode == 0, result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {
        (r.data.params["dataset"], r.data.params["model"]): r
        for name in ("blocks-train", "stripes-train")
        for r in client.search_runs([client.get_experiment_by_name(name).experiment_id])
    }
    assert set(runs) == {("blocks", "conv"), ("stripes", "dense"), ("stripes", "conv")}
    assert {run.info.status for run in runs.values()} == {"FINISHED"}
    assert all(run.data.metrics["test_acc"] > 0.4 for run in runs.values()), {
        k: r.data.metrics["test_acc"] for k, r in runs.items()
    }
    # A network's own setting is a parameter of its runs, and of no other network's model.
    assert runs[("blocks", "conv")].data.params["kernel"] == "3"


def test_every_run_records_the_data_it_trained_validated_and_tested_on(tiny_settings, tracking_uri):
    tracker = connect(tracking_uri, "inputs")
    runs = [fit_here(dataclasses.replace(tiny_settings, val_size=size), tracker).run_id for size in (100, 100, 150)]
    runs.append(fit_here(dataclasses.replace(tiny_settings, dataset="stripes"), tracker).run_id)
    inputs = []
    for run_id in runs:
        recorded = MlflowClient(tracking_uri).get_run(run_id).inputs.dataset_inputs
        context = {tag.key: tag.value for d in recorded for tag in d.tags}
        assert context == {"mlflow.data.context": context["mlflow.data.context"]}
        inputs.append({[t.value for t in d.tags][0]: d.dataset for d in recorded})
    same, _, _, other_data = inputs
    assert set(same) == {"training", "validation", "test"}
    digests = [{context: d.digest for context, d in run.items()} for run in inputs]
    assert digests[0] == digests[1]  # the same data and split: the same digests
    assert digests[2]["test"] == digests[0]["test"]  # another split of the same files
    assert digests[2]["training"] != digests[0]["training"] and digests[2]["validation"] != digests[0]["validation"]
    assert not set(digests[3].values()) & set(digests[0].values())  # other files altogether
    assert {d.name for d in same.values()} == {"blocks"} and {d.name for d in other_data.values()} == {"stripes"}
    training = same["training"]
    assert json.loads(training.source)["uri"].endswith("blocks") and training.source_type == "local"
    assert json.loads(training.profile) == {"origin": "existing files"}
    assert "[-1, 1, 16, 16]" in json.loads(training.schema)["mlflow_tensorspec"]["features"]


def test_the_experiments_callbacks_train_beside_the_machinerys_and_log_to_its_run(tiny_settings, tracking_uri):
    """A Lightning callback of the experiment's own that writes to the loggers itself, at the
    start of every epoch (LearningRateMonitor): its values land in the run, one per epoch."""
    tracker = connect(tracking_uri, "callbacks")
    settings = dataclasses.replace(tiny_settings, max_epochs=EPOCHS)
    arguments = {"callbacks": [LearningRateMonitor(logging_interval="epoch")]}
    result = fit_here(settings, tracker, trainer_arguments=arguments)
    history = tracker.client.get_metric_history(result.run_id, "lr-SGD")
    assert [m.step for m in history] == list(range(EPOCHS)) and {m.value for m in history} == {settings.lr}
    with pytest.raises(ValueError, match="the experiment's trainer\\(\\) sets max_epochs, logger, which"):
        fit_here(settings, tracker, trainer_arguments={"max_epochs": 3, "logger": False})


def test_a_run_that_stops_early_says_so_in_the_console_and_in_mlflow(call_script, tiny_data, tmp_path):
    # A learning rate so high that val_loss stops improving at once: patience 1 stops it.
    args = ["--lr", "1", "--max-epochs", "30", "--patience", "1", "--data-dir", str(tiny_data)]
    result = call_script("train.py", *args)
    assert result.returncode == 0, result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("blocks-train").experiment_id])
    epochs, best = int(run.data.metrics["epochs"]), int(run.data.metrics["best_epoch"])
    assert epochs < 30 and epochs == best + 2  # the best epoch, and one more without improvement
    said = f"stopped early after {epochs} of 30 epochs (best epoch {best + 1})"  # lines count epochs from 1
    assert run.data.tags["stopped_early"] == said and said in result.stdout.splitlines()
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == epochs


def best_val_losses(tracking_uri: str, experiment: str) -> list[float]:
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], order_by=["start_time"])
    return [run.data.metrics["best_val_loss"] for run in runs]


def test_a_trial_trained_again_gives_its_val_loss_exactly(study_env, call_script, tmp_path):
    session = study_env("again", n_trials=2, max_epochs=3)
    trial = session.study.trials[1]
    result = call_script("train.py", "--from-trial", "again:1", "--storage", study_env.storage)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("training trial again:1 again, as recorded and as the flags change it, with ")
    for name, value in trial.params.items():
        assert f"{name}={value!r}" in first  # every digit: the line can be typed back
    assert f"seed={trial.number}" in first
    [again] = best_val_losses(f"sqlite:///{tmp_path / 'mlflow.db'}", "blocks-train")
    assert again == trial.value  # exactly: the same settings, seed, data and threads

    # Any flag given changes that one setting only.
    longer = call_script("train.py", "--from-trial", "again:1", "--storage", study_env.storage, "--max-epochs", "4")
    assert longer.returncode == 0, longer.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("blocks-train").experiment_id], order_by=["start_time"])
    params = [run.data.params for run in runs]
    assert params[1]["max_epochs"] == "4" and {k: v for k, v in params[1].items() if k != "max_epochs"} == {
        k: v for k, v in params[0].items() if k != "max_epochs"
    }


def test_a_run_trained_again_takes_its_logged_settings(call_script, tiny_data, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = call_script("train.py", "--lr", "0.0123456789", "--width", "9", "--seed", "5", "--data-dir", str(tiny_data))
    assert first.returncode == 0, first.stderr
    [run] = MlflowClient(tracking_uri).search_runs(["1"])
    again = call_script("train.py", "--from-run", run.info.run_id)
    assert again.returncode == 0, again.stderr
    assert best_val_losses(tracking_uri, "blocks-train") == [run.data.metrics["best_val_loss"]] * 2
    second = MlflowClient(tracking_uri).search_runs(["1"], order_by=["start_time DESC"])[0]
    assert {k: second.data.params[k] for k in ("lr", "width", "seed")} == {"lr": "0.0123456789", "width": "9",
                                                                           "seed": "5"}  # fmt: skip


def test_what_cannot_be_trained_again_is_one_line(study_env, call_script, tmp_path):
    session = study_env("refused", n_trials=1)
    storage = ["--storage", study_env.storage]
    cases = [
        (("--from-trial", "refused"), "--from-trial", "'refused' is not STUDY:NUMBER"),
        (("--from-trial", "nowhere:0", *storage), "--from-trial", "no study 'nowhere' in sqlite:///"),
        (("--from-trial", "refused:7", *storage), "--from-trial", "study 'refused' has no trial 7 (1 trials)"),
        (("--from-run", "0123456789abcdef", "--tracking-uri", study_env.tracker.tracking_uri), "--from-run",
         "no run 0123456789abcdef in"),
        (("--from-run", session.parent_run_id, "--tracking-uri", study_env.tracker.tracking_uri), "--from-run",
         "is study 'refused''s own run: name one of its trials' runs, or --from-trial"),
        (("--from-trial", "refused:0", "--from-run", session.parent_run_id, *storage), "--from-run", "not both"),
    ]  # fmt: skip
    for args, flag, said in cases:
        result = call_script("train.py", *args)
        assert result.returncode == 2, (args, result.stderr)
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"train.py: error: argument {flag}: ") and said in line, line
    empty = tmp_path / "empty"
    empty.mkdir()
    stores = ("--storage", f"sqlite:///{empty / 'optuna.db'}", "--tracking-uri", f"sqlite:///{empty / 'mlflow.db'}")
    for args in (("--from-trial", "refused:0", *stores), ("--from-run", session.parent_run_id, *stores)):
        result = call_script("train.py", *args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(empty.iterdir()) == []  # read from: none made


def test_train_registers_its_model_and_the_champion_moves_only_to_a_better_one(call_script, tiny_data, tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    lines = []
    for lr in ("0.005", "0.05", "0.003"):  # learns little in two epochs, then well, then little again
        result = call_script("train.py", "--register", "--lr", lr, "--data-dir", str(tiny_data))
        assert result.returncode == 0, result.stderr
        lines.append(next(line for line in result.stdout.splitlines() if "blocks-classifier" in line))
    champion = "models:/blocks-classifier@champion"
    assert lines[0] == f"registered as blocks-classifier version 1: now {champion} (the best so far)"
    assert lines[1].startswith(f"registered as blocks-classifier version 2: now {champion} (the best so far, was "
                               "version 1: val_loss ")  # fmt: skip
    assert lines[2].startswith(f"registered as blocks-classifier version 3; {champion} stays version 2, whose")
    version = client.get_model_version_by_alias("blocks-classifier", "champion")
    assert int(version.version) == 2 and version.tags["seed"] == "0" and version.tags["lr"] == "0.05"
    run = client.get_run(version.tags["run_id"])
    assert float(version.tags["val_loss"]) == run.data.metrics["best_val_loss"] and run.data.params["lr"] == "0.05"
