"""The best model, ready to use: logged in its study's experiment, loadable through
mlflow.pytorch and mlflow.pyfunc, with what it was trained for in its metadata, and registered
with the champion alias on the best so far (one registered model per task)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY_TEST
from tiny import experiment as tiny
from tiny.settings import TinySettings
from tunetrack.machinery.options import Options
from tunetrack.machinery.study.retraining import typed
from tunetrack.machinery.tracking import registry
from tunetrack.machinery.tracking.mlflow_runs import connect
from tunetrack.machinery.training.fit import TrackedRun, fit, load_weights


def test_the_best_model_is_in_its_studys_experiment_and_loads_both_ways(study_env):
    session = study_env("loads", n_trials=2)
    tracker = study_env.tracker
    assert tracker.client.get_logged_model(session.model_id).experiment_id == tracker.experiment_id

    mlflow.set_tracking_uri(tracker.tracking_uri)
    uri = f"models:/{session.model_id}"
    images, labels = tiny.pictures(TINY_TEST, seed=1, pattern=tiny.PATTERNS["blocks"])  # the test split, as raw pixels
    pixels = (images.astype(np.float32) / 255)[:, None]
    as_torch = mlflow.pytorch.load_model(uri)
    with torch.no_grad():
        by_torch = as_torch(torch.from_numpy(pixels)).argmax(dim=1).numpy()
    by_pyfunc = mlflow.pyfunc.load_model(uri).predict(pixels).argmax(axis=1)
    assert (by_torch == by_pyfunc).all()
    # Both are the best trial's best epoch, whose test accuracy the study logged.
    assert float(np.mean(by_torch == labels)) == pytest.approx(session.test["test_acc"], abs=1e-6)
    # Its pyfunc flavour loads on the CPU wherever it is loaded: no GPU machine refuses it.
    flavors = mlflow.models.get_model_info(uri).flavors
    served = flavors["python_function"]
    assert served["loader_module"] == "tunetrack_served_model" and served["config"]["device"] == "cpu"
    assert served["config"]["classes"] == list(tiny.CLASSES) and served["config"]["input_shape"] == [1, 16, 16]
    card = registry.card_of(uri)  # what predict.py prepares pictures for, and names the answers by
    assert (card.task, card.dataset, card.classes, card.input_shape) == ("blocks", "blocks", tiny.CLASSES, (1, 16, 16))


def test_the_champion_alias_moves_only_to_a_better_version(tiny_settings, tracking_uri):
    tracker = connect(tracking_uri, "registry")
    model, data = tiny.build(dataclasses.replace(tiny_settings, width=8))

    def register(val_loss: float, trial: int):
        with tracker.run(f"study of val_loss {val_loss}") as run_id:
            model_id = registry.log_model(tracker, run_id, model, data, "digits", tiny.DATASETS)
        tags = {"study_uid": "u", "trial": trial}
        score = registry.Score("val_loss", "minimize", val_loss)
        return registry.register(
            tracker, "digits", registry.Candidate(model_id, tags, score, same=("study_uid", "trial"))
        )

    first = register(0.5, trial=1)
    assert (first.version, first.champion) == (1, 1)
    assert first.line() == "registered as digits version 1: now models:/digits@champion (the best so far)"
    worse = register(0.7, trial=2)
    assert (worse.version, worse.champion) == (2, 1)
    assert "models:/digits@champion stays version 1, whose val_loss, 0.5000, is no higher" in worse.line()
    better = register(0.3, trial=3)
    assert (better.version, better.champion, better.previous_champion) == (3, 3, 1)
    assert better.line().endswith("(the best so far, was version 1: val_loss 0.3000 against 0.5000)")
    again = register(0.3, trial=3)  # the same trial of the same study, from a later session
    assert (again.version, again.champion) == (3, 3)
    assert again.line() == "digits version 3 is this best model, as registered before: still models:/digits@champion"
    assert int(tracker.client.get_model_version_by_alias("digits", "champion").version) == 3
    assert len(tracker.client.search_model_versions("name = 'digits'")) == 3


def test_a_champion_validated_on_other_data_that_cannot_be_measured_keeps_the_alias(tiny_settings, tracking_uri):
    """A val_loss measured on another validation split (another --val-size) says nothing of the
    champion's; where the champion cannot be measured on this one's (a version registered
    without its settings and run), the alias stays, and the line says why and what to do."""
    tracker = connect(tracking_uri, "registry")
    model, data = tiny.build(dataclasses.replace(tiny_settings, width=8))

    def register(val_loss: float, validation: str):
        with tracker.run(f"validated on {validation}") as run_id:
            model_id = registry.log_model(tracker, run_id, model, data, "digits", tiny.DATASETS)
        tags = {"validation_data": validation}
        score = registry.Score("val_loss", "minimize", val_loss)
        return registry.register(
            tracker, "digits", registry.Candidate(model_id, tags, score, validated_on="validation_data")
        )

    first = register(0.5, "mnist 60-images")
    elsewhere = register(0.01, "mnist 20-images")
    assert (elsewhere.version, elsewhere.champion) == (2, 1)
    assert elsewhere.line() == (
        "registered as digits version 2; models:/digits@champion stays version 1, chosen on other data or by another "
        "objective, which cannot be measured on this one's (--registered-model NAME starts a registered model of its "
        "own)"
    )
    better = register(0.3, "mnist 60-images")
    assert (first.champion, better.version, better.champion) == (1, 3, 3)
    assert int(tracker.client.get_model_version_by_alias("digits", "champion").version) == 3


def test_a_champion_of_a_lucky_split_is_measured_on_the_next_ones_and_gives_the_alias_up(
    call_script, tiny_data, tmp_path
):
    """A model that learned little, validated on a split of a few images, and then a good one
    validated on the usual split: the first's val_loss on the second's validation data decides,
    and the better model is the champion."""
    lucky = call_script("train.py", "--register", "--val-size", "5", "--lr", "0.003", "--max-epochs", "1",
                        "--data-dir", str(tiny_data))  # fmt: skip
    assert "now models:/blocks-classifier@champion (the best so far)" in lucky.stdout, lucky.stderr
    usual = call_script("train.py", "--register", "--data-dir", str(tiny_data))
    [line] = [line for line in usual.stdout.splitlines() if "blocks-classifier" in line]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert int(client.get_model_version_by_alias("blocks-classifier", "champion").version) == 2, line
    assert "was version 1, chosen on other data or by another objective and measured on this one's: val_loss " in line
    measured = float(line.split(" against ")[1].rstrip(")"))
    assert line.startswith("registered as blocks-classifier version 2: now models:/blocks-classifier@champion")

    # What it was measured by: the first model's weights on the second's validation split.
    first, second = (client.get_model_version("blocks-classifier", str(v)) for v in (1, 2))
    settings = TinySettings(**typed(TinySettings, first.tags))
    model, _ = tiny.build(settings)
    checkpoint = client.download_artifacts(first.tags["run_id"], "checkpoints/best.ckpt", str(tmp_path))
    load_weights(model, checkpoint).eval()
    _, data = tiny.build(TinySettings(data_dir=str(tiny_data)))
    data.setup("fit")
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in data.val_dataloader()]
    assert measured == pytest.approx(float(sum(losses)) / len(data.splits["val"][1]), abs=1e-4)
    assert measured > float(second.tags["val_loss"]) and float(first.tags["val_loss"]) != pytest.approx(measured)


@pytest.mark.parametrize("store", ["overwrites", "refuses"])
def test_two_studies_that_register_at_the_same_moment_agree_on_the_champion(tiny_settings, tracking_uri, store):
    """Two machines that end together: between this study's reading of the registry and its
    setting of the alias, another study registers a better version and sets the alias. The
    store then either takes this study's setting over the other's (an alias that exists is
    overwritten) or refuses it as a duplicate key (two first settings at once, seen on
    PostgreSQL). Either way this study reads again, and the better version stays champion."""
    tracker = connect(tracking_uri, "registry")
    model, data = tiny.build(dataclasses.replace(tiny_settings, width=8))
    model_ids = {}
    for study in ("ours", "theirs"):
        with tracker.run(study) as run_id:
            model_ids[study] = registry.log_model(tracker, run_id, model, data, "digits", tiny.DATASETS)
    set_alias, raced = tracker.client.set_registered_model_alias, []

    def racing(name: str, alias: str, version: str) -> None:
        if raced:  # the other study's call, and ours after the race
            return set_alias(name, alias, version)
        raced.append(version)
        theirs = registry.Candidate(
            model_ids["theirs"], {"study": "theirs"}, registry.Score("val_loss", "minimize", 0.3)
        )
        registry.register(tracker, name, theirs)
        if store == "refuses":
            raise mlflow.exceptions.MlflowException('duplicate key value violates unique constraint "alias_pk"')
        return set_alias(name, alias, version)

    tracker.client.set_registered_model_alias = racing
    candidate = registry.Candidate(model_ids["ours"], {"study": "ours"}, registry.Score("val_loss", "minimize", 0.5))
    ours = registry.register(tracker, "digits", candidate)
    assert raced == ["1"]  # this study found no champion and set its own version, as the other did
    assert (ours.version, ours.champion) == (1, 2)
    assert ours.line() == (
        "registered as digits version 1; models:/digits@champion stays version 2, whose val_loss, 0.3000, is no higher"
    )
    assert int(tracker.client.get_model_version_by_alias("digits", "champion").version) == 2


def test_a_refusal_that_is_no_race_is_said_as_it_is(tiny_settings, tracking_uri):
    tracker = connect(tracking_uri, "registry")
    model, data = tiny.build(dataclasses.replace(tiny_settings, width=8))
    with tracker.run("ours") as run_id:
        model_id = registry.log_model(tracker, run_id, model, data, "digits", tiny.DATASETS)

    def refused(name: str, alias: str, version: str) -> None:
        raise mlflow.exceptions.MlflowException("permission denied")

    tracker.client.set_registered_model_alias = refused
    with pytest.raises(mlflow.exceptions.MlflowException, match="permission denied"):
        registry.register(
            tracker, "digits", registry.Candidate(model_id, {}, registry.Score("val_loss", "minimize", 0.1))
        )


def test_a_study_registers_its_best_model_and_says_so(study_env, capsys):
    session = study_env("registers", n_trials=2)
    tracker = study_env.tracker
    assert session.registered.version == session.registered.champion == 1
    said = "registered as blocks-classifier version 1: now models:/blocks-classifier@champion"
    assert said in capsys.readouterr().out
    version = tracker.client.get_model_version_by_alias("blocks-classifier", "champion")
    best = min(session.study.trials, key=lambda t: t.value)
    assert version.tags["study"] == "registers" and version.tags["trial"] == str(best.number)
    assert float(version.tags["val_loss"]) == best.value and version.tags["objective"] == "val_loss"
    assert float(version.tags["test_acc"]) == pytest.approx(session.test["test_acc"])
    assert version.tags["dataset"] == "blocks" and version.tags["model"] == "dense"
    assert version.tags["seed"] == str(best.number) and version.tags["lr"] == repr(best.params["lr"])  # exactly
    # What it learned from and was tested on, as the runs record them among their inputs: the
    # trial's run its training and validation data, the study's run the test data.
    inputs = {}
    for run_id in (best.user_attrs["mlflow_run_id"], session.parent_run_id):
        for d in tracker.client.get_run(run_id).inputs.dataset_inputs:
            inputs[[t.value for t in d.tags][0]] = d.dataset.digest
    assert set(inputs) == {"training", "validation", "test"}
    for context, digest in inputs.items():
        assert version.tags[f"{context}_data"] == f"blocks {digest}"
    # A study of another task registers a model of its own: @champion compares like with like.
    other = study_env("stripes", n_trials=1, dataset="stripes")
    assert other.registered.name == "stripes-classifier" and other.registered.version == 1
    assert int(tracker.client.get_model_version_by_alias("blocks-classifier", "champion").version) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the claim is about one")
def test_a_model_logged_on_either_kind_of_machine_loads_and_predicts_on_the_other(tiny_settings, tracking_uri):
    """Trained and logged on the GPU, it predicts through both loaders here and in a process that
    sees no GPU; logged from a CPU-trained network, it predicts through pyfunc here, with CUDA."""
    tracker = connect(tracking_uri, "devices")
    images, _ = tiny.pictures(TINY_TEST, seed=1, pattern=tiny.PATTERNS["blocks"])
    pixels = (images.astype(np.float32) / 255)[:, None]
    for accelerator in ("cuda", "cpu"):
        settings = dataclasses.replace(tiny_settings, max_epochs=1)
        with tracker.run(accelerator) as run_id:
            model, data = tiny.build(settings)
            run = TrackedRun(tracker, run_id, Options(accelerator=accelerator), progress_bar=False)
            result = fit(model, data, settings, run)
            model_id = registry.log_model(tracker, run_id, result.model, data, settings.task, tiny.DATASETS)
        with torch.no_grad():
            expected = result.model.cpu()(torch.from_numpy(pixels)).argmax(dim=1).numpy()
        mlflow.set_tracking_uri(tracking_uri)
        here = mlflow.pyfunc.load_model(f"models:/{model_id}").predict(pixels).argmax(axis=1)
        assert (here == expected).all()
        script = (
            "import sys, mlflow, numpy, torch; assert not torch.cuda.is_available(); "
            f"m = mlflow.pyfunc.load_model('models:/{model_id}'); "
            "p = numpy.load(sys.argv[1]); print(''.join(map(str, m.predict(p).argmax(axis=1))))"
        )
        numpy_file = f"{tracking_uri.removeprefix('sqlite:///')}.{accelerator}.npy"
        np.save(numpy_file, pixels)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "MLFLOW_TRACKING_URI": tracking_uri}
        elsewhere = subprocess.run([sys.executable, "-c", script, numpy_file], env=env, capture_output=True, text=True)
        assert elsewhere.stdout.strip() == "".join(map(str, expected)), elsewhere.stderr
