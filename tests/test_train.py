"""scripts/train.py and the training function behind it."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REAL_DATA_DIR, TINY_TEST, TINY_VAL, tiny_images
from mnist_hpo import data
from mnist_hpo.config import TrainConfig
from mnist_hpo.data import normalize
from mnist_hpo.devtools.benchmark import train_plainly
from mnist_hpo.model import LitClassifier
from mnist_hpo.tracking import connect
from mnist_hpo.training import fit

EPOCHS = 3


def test_train_script_tracks_one_finished_run(run_script, tiny_data, tmp_path):
    data_dir, _ = tiny_data
    result = run_script(
        "train.py",
        "--lr",
        "3e-3",
        "--hidden-dim",
        "32",
        "--batch-size",
        "50",
        "--max-epochs",
        str(EPOCHS),
        "--val-size",
        str(TINY_VAL),
        "--data-dir",
        str(data_dir),
        "--experiment",
        "e2e",
    )
    assert result.returncode == 0, result.stderr
    assert "MNIST: using the files in" in result.stdout
    assert "look at it: mlflow ui   then" in result.stdout  # the default store: no flags needed

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id in result.stdout
    params = run.data.params
    assert {k: params[k] for k in ("lr", "hidden_dim", "batch_size", "max_epochs", "seed", "val_size")} == {
        "lr": "0.003",
        "hidden_dim": "32",
        "batch_size": "50",
        "max_epochs": str(EPOCHS),
        "seed": "0",
        "val_size": str(TINY_VAL),
    }
    assert params["data_source"] == "existing files"
    for name in ("train_loss", "val_loss", "val_acc"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == list(range(EPOCHS)), name
    val_loss = [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert run.data.metrics["best_val_loss"] == min(val_loss)
    assert val_loss[-1] < val_loss[0]  # it learned
    # The test metrics are those of the best epoch's weights, as logged in its checkpoint.
    checkpoint = client.download_artifacts(run.info.run_id, "checkpoints/best.ckpt", str(tmp_path))
    model = LitClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    images, labels = tiny_images(TINY_TEST, seed=1)
    with torch.no_grad():
        predicted = model(normalize(torch.from_numpy(images))).argmax(dim=1)
    accuracy = (predicted == torch.from_numpy(labels).long()).float().mean().item()
    assert run.data.metrics["test_acc"] == pytest.approx(accuracy, abs=1e-6)
    assert accuracy > 0.3  # ten classes: chance is 0.1
    assert f"test_acc {accuracy:.4f}" in result.stdout
    [checkpoints] = client.list_artifacts(run.info.run_id)
    assert [a.path for a in client.list_artifacts(run.info.run_id, checkpoints.path)] == ["checkpoints/best.ckpt"]


def test_the_same_seed_gives_the_same_metrics(tiny_mnist, tracking_uri):
    tracker = connect(tracking_uri, "seeds")
    config = TrainConfig(lr=3e-3, hidden_dim=16, batch_size=32, max_epochs=2, seed=7, val_size=TINY_VAL)
    results = []
    for _ in range(2):
        with tracker.run("seeded") as run_id:
            results.append(
                fit(config, tracker, run_id, data_dir=str(tiny_mnist), accelerator="cpu", progress_bar=False)
            )
    first, second = results
    assert (first.val_loss, first.val_acc, first.test_acc) == (second.val_loss, second.val_acc, second.test_acc)
    history = [[m.value for m in tracker.client.get_metric_history(r.run_id, "train_loss")] for r in results]
    assert history[0] == history[1]
    with tracker.run("other seed") as run_id:
        other = fit(
            TrainConfig(**{**config.__dict__, "seed": 8}),
            tracker,
            run_id,
            data_dir=str(tiny_mnist),
            accelerator="cpu",
            progress_bar=False,
        )
    assert other.val_loss != first.val_loss


def test_lightning_trains_exactly_as_a_plain_pytorch_loop(tiny_mnist, tracking_uri):
    """fit(), Lightning and the chunks of minibatches included, makes the same updates as the
    plain loop the benchmark times: the same curves, to float precision."""
    config = TrainConfig(hidden_dim=32, batch_size=20, lr=3e-3, max_epochs=3, seed=5, val_size=TINY_VAL)
    tracker = connect(tracking_uri, "same")
    with tracker.run("lightning") as run_id:  # 25 minibatches an epoch: chunks of 16 and 9
        fit(
            config,
            tracker,
            run_id,
            data_dir=str(tiny_mnist),
            accelerator="cpu",
            evaluate_test=False,
            progress_bar=False,
        )
    plain = train_plainly(config, str(tiny_mnist))
    for name, values in plain.items():
        assert tracker.metric_history(run_id, name) == pytest.approx(values, rel=1e-5), name
    assert plain["val_loss"][-1] < plain["val_loss"][0]


@pytest.mark.slow
def test_one_epoch_on_the_real_mnist_reaches_95_percent(tracking_uri, capsys, monkeypatch):
    """Through the real prepare_data path: the files, or torchvision's mirrors, or the offline
    fallback, verified against the official MD5s."""
    monkeypatch.setattr(data, "_verified", {})  # verified here, whatever other tests did before
    tracker = connect(tracking_uri, "real")
    with tracker.run("real") as run_id:
        result = fit(TrainConfig(max_epochs=1), tracker, run_id, data_dir=str(REAL_DATA_DIR), progress_bar=False)
    assert result.val_acc >= 0.95 and result.test_acc >= 0.95
    assert "(MD5 verified)" in capsys.readouterr().out
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["val_size"] == "5000"
