"""scripts/train.py and the training function behind it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REAL_DATA_DIR, TINY_TEST, TINY_VAL, tiny_images
from experiment.search import build
from experiment.settings import Settings
from machinery import files
from machinery.options import Options
from machinery.tracking import connect
from machinery.training import fit, load_weights

EPOCHS = 3


def test_train_script_tracks_one_finished_run(run_script, tiny_data, tmp_path):
    data_dir, _ = tiny_data
    result = run_script(
        "train.py", "--lr", "3e-3", "--hidden-dim", "32", "--batch-size", "50", "--max-epochs", str(EPOCHS),
        "--val-size", str(TINY_VAL), "--data-dir", str(data_dir), "--experiment", "e2e",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "mnist: using the files in" in result.stdout
    assert "look at it: mlflow ui   then" in result.stdout  # the default store: no flags needed

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id in result.stdout
    params = run.data.params
    assert {k: params[k] for k in ("dataset", "model", "lr", "hidden_dim", "batch_size", "max_epochs", "seed")} == {
        "dataset": "mnist", "model": "mlp", "lr": "0.003", "hidden_dim": "32", "batch_size": "50",
        "max_epochs": str(EPOCHS), "seed": "0",
    }  # fmt: skip
    assert params["val_size"] == str(TINY_VAL) and params["data_source"] == "existing files"
    for name in ("train_loss", "val_loss", "val_acc"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == list(range(EPOCHS)), name
    val_loss = [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert run.data.metrics["best_val_loss"] == min(val_loss)
    assert val_loss[-1] < val_loss[0]  # it learned
    # The test metrics are those of the best epoch's weights, as logged in its checkpoint.
    checkpoint = client.download_artifacts(run.info.run_id, "checkpoints/best.ckpt", str(tmp_path))
    settings = Settings(lr=3e-3, hidden_dim=32, batch_size=50, max_epochs=EPOCHS, val_size=TINY_VAL)
    model = load_weights(build(settings)[0], checkpoint).eval()
    images, labels = tiny_images(TINY_TEST, seed=1)
    with torch.no_grad():
        predicted = model(torch.from_numpy(images).float().unsqueeze(1) / 255).argmax(dim=1)
    accuracy = (predicted == torch.from_numpy(labels).long()).float().mean().item()
    assert run.data.metrics["test_acc"] == pytest.approx(accuracy, abs=1e-6)
    assert accuracy > 0.3  # ten classes: chance is 0.1
    assert f"test_acc {accuracy:.4f}" in result.stdout
    [checkpoints] = client.list_artifacts(run.info.run_id)
    assert [a.path for a in client.list_artifacts(run.info.run_id, checkpoints.path)] == ["checkpoints/best.ckpt"]


def fit_here(settings, tracker, name: str = "run"):
    with tracker.run(name) as run_id:
        model, data = build(settings)
        return fit(model, data, settings, Options(accelerator="cpu"), tracker, run_id, progress_bar=False)


def test_the_same_seed_gives_the_same_metrics(tiny_settings, tracking_uri):
    tracker = connect(tracking_uri, "seeds")
    settings = dataclasses.replace(tiny_settings, lr=3e-3, hidden_dim=16, batch_size=32, seed=7)
    first, second = fit_here(settings, tracker), fit_here(settings, tracker)
    assert (first.val_loss, first.val_acc, first.test_acc) == (second.val_loss, second.val_acc, second.test_acc)
    history = [tracker.metric_history(r.run_id, "train_loss") for r in (first, second)]
    assert history[0] == history[1]
    other = fit_here(dataclasses.replace(settings, seed=8), tracker)
    assert other.val_loss != first.val_loss


def test_the_cnn_and_mnists_kin_train_through_the_same_script(call_script, tiny_files, tmp_path):
    for args in (["--model", "cnn"], ["--dataset", "fashion-mnist"], ["--dataset", "kmnist", "--model", "cnn"]):
        result = call_script("train.py", *args, "--max-epochs", "4", "--lr", "3e-3", "--batch-size", "32",
                             "--val-size", str(TINY_VAL), "--data-dir", str(tiny_files))  # fmt: skip
        assert result.returncode == 0, result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {
        (r.data.params["dataset"], r.data.params["model"]): r
        for name in ("mnist-train", "fashion-mnist-train", "kmnist-train")
        for r in client.search_runs([client.get_experiment_by_name(name).experiment_id])
    }
    assert set(runs) == {("mnist", "cnn"), ("fashion-mnist", "mlp"), ("kmnist", "cnn")}
    assert {run.info.status for run in runs.values()} == {"FINISHED"}, {
        k: r.data.metrics["test_acc"] for k, r in runs.items()
    }
    assert all(run.data.metrics["test_acc"] > 0.3 for run in runs.values()), {
        k: r.data.metrics["test_acc"] for k, r in runs.items()
    }


@pytest.mark.slow
def test_one_epoch_on_the_real_mnist_reaches_95_percent(tracking_uri, capsys, monkeypatch):
    """Through the real prepare_data path: the files, or torchvision's mirrors, or the offline
    fallback, verified against the official MD5s."""
    monkeypatch.setattr(files, "_verified", {})  # verified here, whatever other tests did before
    result = fit_here(Settings(max_epochs=1, data_dir=str(REAL_DATA_DIR)), connect(tracking_uri, "real"))
    assert result.val_acc >= 0.95 and result.test_acc >= 0.95
    assert "(MD5 verified)" in capsys.readouterr().out
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["val_size"] == "5000"


def test_every_run_records_the_data_it_trained_validated_and_tested_on(tiny_settings, tracking_uri):
    tracker = connect(tracking_uri, "inputs")
    runs = [fit_here(dataclasses.replace(tiny_settings, val_size=size), tracker).run_id for size in (100, 100, 150)]
    runs.append(fit_here(dataclasses.replace(tiny_settings, dataset="kmnist"), tracker).run_id)
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
    assert {d.name for d in same.values()} == {"mnist"} and {d.name for d in other_data.values()} == {"kmnist"}
    training = same["training"]
    assert json.loads(training.source)["uri"].endswith("MNIST/raw") and training.source_type == "local"
    assert json.loads(training.profile) == {"origin": "existing files"}
    assert "[-1, 1, 28, 28]" in json.loads(training.schema)["mlflow_tensorspec"]["features"]
