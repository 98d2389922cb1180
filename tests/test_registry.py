"""The best model, ready to use: logged in its study's experiment, loadable through
mlflow.pytorch and mlflow.pyfunc, registered with the champion alias on the best so far (one
registered model per task), read by scripts/predict.py from ordinary pictures, and served over
HTTP by `mlflow models serve`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
import zlib

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REAL_DATA_DIR, TINY_TEST, TINY_VAL, tiny_images
from experiment.data import MNISTDataModule
from experiment.pictures import digit
from experiment.search import build
from experiment.settings import Settings
from machinery import registry
from machinery.options import Options
from machinery.tracking import connect
from machinery.training import fit
from workbench.photos import digit_pictures
from workbench.servers import free_port


def test_the_best_model_is_in_its_studys_experiment_and_loads_both_ways(study_env):
    session = study_env("loads", n_trials=2)
    tracker = study_env.tracker
    assert tracker.client.get_logged_model(session.model_id).experiment_id == tracker.experiment_id

    mlflow.set_tracking_uri(tracker.tracking_uri)
    uri = f"models:/{session.model_id}"
    images, labels = tiny_images(TINY_TEST, seed=1)  # the tiny test split, as raw pixels
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
    assert flavors["python_function"]["model_config"] == {"device": "cpu"}
    assert registry.task_of(uri) == "mnist"  # what predict.py prepares pictures for


def test_the_champion_alias_moves_only_to_a_better_version(tiny_settings, tracking_uri):
    tracker = connect(tracking_uri, "registry")
    model, data = build(dataclasses.replace(tiny_settings, hidden_dim=8))

    def register(val_loss: float, trial: int):
        with tracker.run(f"study of val_loss {val_loss}") as run_id:
            model_id = registry.log_model(tracker, run_id, model, data, "digits")
        tags = {"study_uid": "u", "trial": trial}
        return registry.register(tracker, model_id, "digits", tags, val_loss, same=("study_uid", "trial"))

    first = register(0.5, trial=1)
    assert (first.version, first.champion) == (1, 1)
    assert first.line() == "registered as digits version 1: now models:/digits@champion (the best so far)"
    worse = register(0.7, trial=2)
    assert (worse.version, worse.champion) == (2, 1)
    assert "models:/digits@champion stays version 1, whose val_loss 0.5000 is lower" in worse.line()
    better = register(0.3, trial=3)
    assert (better.version, better.champion, better.previous_champion) == (3, 3, 1)
    assert better.line().endswith("(the best so far, was version 1)")
    again = register(0.3, trial=3)  # the same trial of the same study, from a later session
    assert (again.version, again.champion) == (3, 3)
    assert again.line() == "digits version 3 is this best model, as registered before: still models:/digits@champion"
    assert int(tracker.client.get_model_version_by_alias("digits", "champion").version) == 3
    assert len(tracker.client.search_model_versions("name = 'digits'")) == 3


def test_a_version_validated_on_other_data_never_takes_the_alias(tiny_settings, tracking_uri):
    """A val_loss measured on another validation split (another --val-size) says nothing of the
    champion's: the alias stays, and the line says why and what to do."""
    tracker = connect(tracking_uri, "registry")
    model, data = build(dataclasses.replace(tiny_settings, hidden_dim=8))

    def register(val_loss: float, validation: str):
        with tracker.run(f"validated on {validation}") as run_id:
            model_id = registry.log_model(tracker, run_id, model, data, "digits")
        tags = {"validation_data": validation}
        return registry.register(tracker, model_id, "digits", tags, val_loss, validated_on="validation_data")

    first = register(0.5, "mnist 60-images")
    elsewhere = register(0.01, "mnist 20-images")
    assert (elsewhere.version, elsewhere.champion) == (2, 1)
    assert elsewhere.line() == (
        "registered as digits version 2; models:/digits@champion stays version 1, validated on other data, whose "
        "val_loss says nothing of this one's (--registered-model NAME starts a registered model of its own)"
    )
    better = register(0.3, "mnist 60-images")
    assert (first.champion, better.version, better.champion) == (1, 3, 3)
    assert int(tracker.client.get_model_version_by_alias("digits", "champion").version) == 3


@pytest.mark.parametrize("store", ["overwrites", "refuses"])
def test_two_studies_that_register_at_the_same_moment_agree_on_the_champion(tiny_settings, tracking_uri, store):
    """Two machines that end together: between this study's reading of the registry and its
    setting of the alias, another study registers a better version and sets the alias. The
    store then either takes this study's setting over the other's (an alias that exists is
    overwritten) or refuses it as a duplicate key (two first settings at once, seen on
    PostgreSQL). Either way this study reads again, and the better version stays champion."""
    tracker = connect(tracking_uri, "registry")
    model, data = build(dataclasses.replace(tiny_settings, hidden_dim=8))
    model_ids = {}
    for study in ("ours", "theirs"):
        with tracker.run(study) as run_id:
            model_ids[study] = registry.log_model(tracker, run_id, model, data, "digits")
    set_alias, raced = tracker.client.set_registered_model_alias, []

    def racing(name: str, alias: str, version: str) -> None:
        if raced:  # the other study's call, and ours after the race
            return set_alias(name, alias, version)
        raced.append(version)
        registry.register(tracker, model_ids["theirs"], name, {"study": "theirs"}, 0.3)
        if store == "refuses":
            raise mlflow.exceptions.MlflowException('duplicate key value violates unique constraint "alias_pk"')
        return set_alias(name, alias, version)

    tracker.client.set_registered_model_alias = racing
    ours = registry.register(tracker, model_ids["ours"], "digits", {"study": "ours"}, 0.5)
    assert raced == ["1"]  # this study found no champion and set its own version, as the other did
    assert (ours.version, ours.champion) == (1, 2)
    assert ours.line() == (
        "registered as digits version 1; models:/digits@champion stays version 2, whose val_loss 0.3000 is lower"
    )
    assert int(tracker.client.get_model_version_by_alias("digits", "champion").version) == 2


def test_a_refusal_that_is_no_race_is_said_as_it_is(tiny_settings, tracking_uri):
    tracker = connect(tracking_uri, "registry")
    model, data = build(dataclasses.replace(tiny_settings, hidden_dim=8))
    with tracker.run("ours") as run_id:
        model_id = registry.log_model(tracker, run_id, model, data, "digits")

    def refused(name: str, alias: str, version: str) -> None:
        raise mlflow.exceptions.MlflowException("permission denied")

    tracker.client.set_registered_model_alias = refused
    with pytest.raises(mlflow.exceptions.MlflowException, match="permission denied"):
        registry.register(tracker, model_id, "digits", {}, 0.1)


def test_a_study_registers_its_best_model_and_says_so(study_env, capsys):
    session = study_env("registers", n_trials=2)
    tracker = study_env.tracker
    assert session.registered.version == session.registered.champion == 1
    assert "registered as mnist-classifier version 1: now models:/mnist-classifier@champion" in capsys.readouterr().out
    version = tracker.client.get_model_version_by_alias("mnist-classifier", "champion")
    best = min(session.study.trials, key=lambda t: t.value)
    assert version.tags["study"] == "registers" and version.tags["trial"] == str(best.number)
    assert float(version.tags["val_loss"]) == best.value
    assert float(version.tags["test_acc"]) == pytest.approx(session.test["test_acc"])
    assert version.tags["dataset"] == "mnist" and version.tags["model"] == "mlp" and "seed" not in version.tags
    # What it learned from and was tested on, as the runs record them among their inputs: the
    # trial's run its training and validation data, the study's run the test data.
    inputs = {}
    for run_id in (best.user_attrs["mlflow_run_id"], session.parent_run_id):
        for d in tracker.client.get_run(run_id).inputs.dataset_inputs:
            inputs[[t.value for t in d.tags][0]] = d.dataset.digest
    assert set(inputs) == {"training", "validation", "test"}
    for context, digest in inputs.items():
        assert version.tags[f"{context}_data"] == f"mnist {digest}"
    # A study of another task registers a model of its own: @champion compares like with like.
    other = study_env("clothes", n_trials=1, dataset="fashion-mnist")
    assert other.registered.name == "fashion-mnist-classifier" and other.registered.version == 1
    assert int(tracker.client.get_model_version_by_alias("mnist-classifier", "champion").version) == 1


# The real MNIST from here on: the claims are about pictures of real handwritten digits.


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A network trained for one epoch on the real MNIST, registered as mnist-classifier@champion
    in a store of its own; with the test digits it reads right, confidently, as raw pixels."""
    folder = tmp_path_factory.mktemp("champion")
    tracker = connect(f"sqlite:///{folder / 'mlflow.db'}", "champion")
    settings = Settings(max_epochs=1, data_dir=str(REAL_DATA_DIR))
    with tracker.run("one epoch") as run_id:
        model, data = build(settings)
        result = fit(model, data, settings, Options(), tracker, run_id, progress_bar=False)
        model_id = registry.log_model(tracker, run_id, result.model, data, settings.task)
    registry.register(tracker, model_id, "mnist-classifier", {}, result.val_loss)

    _, _, test_images, test_labels = MNISTDataModule(str(REAL_DATA_DIR)).read()
    images, labels = (test_images[:200, 0] * 255).round().to(torch.uint8), test_labels[:200]
    with torch.no_grad():
        scores = result.model(test_images[:200]).softmax(dim=1)
    sure = [i for i in range(200) if scores[i].argmax() == labels[i] and scores[i].max() > 0.95]
    digits = [next(i for i in sure if labels[i] == d) for d in range(10)]  # one of each
    return tracker, folder, [(images[i].numpy(), int(labels[i])) for i in digits]


def run_predict(folder, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    command = [sys.executable, "scripts/predict.py", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=REAL_DATA_DIR.parent)


@pytest.mark.slow
def test_prepare_makes_a_picture_of_an_mnist_digit_into_that_digit(champion):
    _, _, digits = champion
    for pixels, _ in digits:
        big = Image.fromarray(pixels).resize((140, 140), Image.Resampling.BICUBIC)
        for picture in (big, Image.fromarray(255 - np.asarray(big))):  # light on dark, dark on light
            prepared = digit(picture)
            assert prepared.shape == (28, 28) and prepared.min() == 0 and prepared.max() <= 1
            assert np.corrcoef(prepared.ravel(), pixels.ravel())[0, 1] > 0.8  # the same digit, where it was
            rows, cols = np.indices(prepared.shape)
            assert abs((rows * prepared).sum() / prepared.sum() - 14) <= 0.5  # centred by its mass
            assert abs((cols * prepared).sum() / prepared.sum() - 14) <= 0.5


@pytest.mark.slow
def test_predict_reads_pictures_of_real_digits(champion, tmp_path):
    _, folder, digits = champion
    pictures = digit_pictures(digits, tmp_path)  # scans, photos and pages, PNG and JPEG
    files = [path for path, _ in pictures]
    expected = [f"{path}: {label} (p=" for path, label in pictures]
    result = run_predict(folder, *files)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line[: len(e)] for line, e in zip(lines, expected, strict=True)] == expected


def png_header_only(path, width: int, height: int) -> None:
    """A PNG file that claims ``width`` x ``height`` gray pixels and holds none: enough for a
    reader that checks the size before decoding, and too little for one that does not."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.mark.slow
def test_predict_gives_every_picture_a_line_of_its_own_as_people_make_them(champion, tmp_path):
    _, folder, digits = champion
    good = tmp_path / "good.png"
    Image.fromarray(digits[3][0]).save(good)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    blank = tmp_path / "blank.png"
    Image.new("L", (50, 50), 255).save(blank)
    huge = tmp_path / "huge.png"
    png_header_only(huge, 20_000, 20_000)
    # A big scan, past Pillow's own warning about decompression bombs (89.5 million pixels).
    big = tmp_path / "big.png"
    canvas = Image.new("L", (9_500, 9_500), 0)
    canvas.paste(Image.fromarray(digits[5][0]).resize((5_000, 5_000), Image.Resampling.NEAREST), (2_250, 2_250))
    canvas.save(big, compress_level=1)
    del canvas
    # Drawn in a browser: black ink on a transparent canvas.
    drawn = tmp_path / "drawn.png"
    ink = Image.fromarray(digits[7][0]).resize((200, 200), Image.Resampling.BICUBIC)
    rgba = np.zeros((200, 200, 4), np.uint8)
    rgba[..., 3] = np.asarray(ink)  # opaque where the digit is, transparent around it
    Image.fromarray(rgba, "RGBA").save(drawn)

    pictures = [good, text, tmp_path / "missing.jpg", huge, blank, big, drawn]
    result = run_predict(folder, *pictures)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "Warning" not in result.stderr
    read = [line[: line.index("(p=") + 3] for line in result.stdout.strip().splitlines()]
    assert read == [f"{good}: 3 (p=", f"{big}: 5 (p=", f"{drawn}: 7 (p="]
    assert result.stderr.strip().splitlines() == [
        f"predict.py: error: {text}: not a picture (PNG, JPEG, ...)",
        f"predict.py: error: {tmp_path / 'missing.jpg'}: No such file or directory",
        f"predict.py: error: {huge}: 20000 x 20000 is more than predict.py reads (200,000,000 pixels)",
        f"predict.py: error: {blank}: no digit stands out from the background",
    ]
    nowhere = run_predict(folder, good, "--model", "models:/no-such-model@champion")
    assert nowhere.returncode == 2 and "Traceback" not in nowhere.stderr
    [line] = nowhere.stderr.strip().splitlines()
    assert line.startswith("predict.py: error: argument --model: cannot load models:/no-such-model@champion from ")


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_post_of_digits_with_their_scores(champion):
    _, folder, digits = champion
    port = free_port()
    # MLflow starts uvicorn from PATH: this environment's, as when it is activated.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "PATH": path}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/mnist-classifier@champion",
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(0.5)
        pixels = np.stack([pixels for pixels, _ in digits])[:, None] / 255
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": pixels.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            scores = np.array(json.load(response)["predictions"])
        assert scores.shape == (10, 10)
        assert scores.argmax(axis=1).tolist() == [label for _, label in digits]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the claim is about one")
def test_a_model_logged_on_either_kind_of_machine_loads_and_predicts_on_the_other(tiny_settings, tracking_uri):
    """Trained and logged on the GPU, it predicts through both loaders here and in a process that
    sees no GPU; logged from a CPU-trained network, it predicts through pyfunc here, with CUDA."""
    tracker = connect(tracking_uri, "devices")
    images, _ = tiny_images(TINY_TEST, seed=1)
    pixels = (images.astype(np.float32) / 255)[:, None]
    for accelerator in ("cuda", "cpu"):
        settings = dataclasses.replace(tiny_settings, hidden_dim=32, max_epochs=1, val_size=TINY_VAL)
        with tracker.run(accelerator) as run_id:
            model, data = build(settings)
            result = fit(model, data, settings, Options(accelerator=accelerator), tracker, run_id, progress_bar=False)
            model_id = registry.log_model(tracker, run_id, result.model, data, settings.task)
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
