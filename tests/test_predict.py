"""scripts/predict.py and `mlflow models serve` with the shipped experiment's champions: photos of
real handwritten digits read by a network trained on the real MNIST, and a folder of one's own
pictures (colour, and grey of mixed sizes) tuned, registered, read and served with no Python
written."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import REAL_DATA_DIR, ROOT, call_command, imported_modules
from tunetrack.experiment.data import DATASETS, MNISTDataModule
from tunetrack.experiment.search import build
from tunetrack.experiment.settings import Settings
from tunetrack.machinery.commands.predict import answer
from tunetrack.machinery.data.pictures import digit
from tunetrack.machinery.options import Options
from tunetrack.machinery.tracking import registry
from tunetrack.machinery.tracking.mlflow_runs import connect
from tunetrack.machinery.training.fit import TrackedRun, fit
from workbench.photos import digit_pictures, paper_photos
from workbench.servers import free_port


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A network trained for one epoch on the real MNIST, registered as mnist-classifier@champion
    in a store of its own; with the test digits it reads right, confidently, as raw pixels."""
    folder = tmp_path_factory.mktemp("champion")
    tracker = connect(f"sqlite:///{folder / 'mlflow.db'}", "champion")
    settings = Settings(max_epochs=1, data_dir=str(REAL_DATA_DIR))
    with tracker.run("one epoch") as run_id:
        model, data = build(settings)
        result = fit(model, data, settings, TrackedRun(tracker, run_id, Options(), progress_bar=False))
        model_id = registry.log_model(tracker, run_id, result.model, data, settings.task, DATASETS)
    score = registry.Score("val_loss", "minimize", result.value)
    registry.register(tracker, "mnist-classifier", registry.Candidate(model_id, {}, score))

    test_images, test_labels = MNISTDataModule(settings).read()["test"]
    images, labels = test_images[:200, 0], test_labels[:200]
    with torch.no_grad():
        scores = result.model(test_images[:200].float() / 255).softmax(dim=1)
    sure = [i for i in range(200) if scores[i].argmax() == labels[i] and scores[i].max() > 0.95]
    digits = [next(i for i in sure if labels[i] == d) for d in range(10)]  # one of each
    return tracker, folder, [(images[i].numpy(), int(labels[i])) for i in digits]


def run_predict(folder, *args, python_flags=()):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    command = [sys.executable, *python_flags, "scripts/predict.py", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=REAL_DATA_DIR.parent)


@pytest.mark.slow
def test_prepare_makes_a_picture_of_an_mnist_digit_into_that_digit(champion):
    _, _, digits = champion
    for pixels, _ in digits:
        big = Image.fromarray(pixels).resize((140, 140), Image.Resampling.BICUBIC)
        for picture in (big, Image.fromarray(255 - np.asarray(big))):  # light on dark, dark on light
            prepared = digit(picture, (1, 28, 28))[0]
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


@pytest.mark.slow
def test_predict_imports_neither_optuna_nor_lightnings_trainer(champion, tmp_path):
    """The model says how its pictures are prepared, so reading one needs no experiment: no
    Optuna and no Lightning Trainer (seconds of imports) in predict.py's process."""
    _, folder, digits = champion
    (path, label), *_ = digit_pictures(digits[:1], tmp_path)
    result = run_predict(folder, path, python_flags=("-X", "importtime"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: {label} (p=")
    imported = imported_modules(result.stderr)
    assert "torch" in imported and "mlflow" in imported  # what it does use: the list is whole
    assert not {name for name in imported if name.split(".")[0] == "optuna"}
    assert not {name for name in imported if name.startswith("pytorch_lightning")}


# predict.py's own faults, with the tiny experiment's champion.


@pytest.fixture
def tiny_champion(call_script, tiny_data, tmp_path):
    """The tiny experiment's model, registered as blocks-classifier@champion in this folder's
    store, and a picture of a block to read; returns the picture."""
    trained = call_script("train.py", "--register", "--data-dir", str(tiny_data))
    assert trained.returncode == 0, trained.stderr
    picture = tmp_path / "block.png"
    Image.new("RGB", (40, 40), (200, 200, 200)).save(picture)
    return picture


def model_files(folder) -> dict[str, Path]:
    [model] = folder.glob("mlruns/*/models/*/artifacts")
    return {"model.pt2": model / "data" / "model.pt2", "MLmodel": model / "MLmodel"}


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("deleted", "FileNotFoundError"),
        ("truncated", "BadZipFile"),
        ("garbage", "BadZipFile"),
        ("bad MLmodel", "ParserError"),
    ],
)
def test_a_damaged_champion_is_one_line_naming_its_version_and_how_to_have_it_again(
    call_script, tiny_champion, tmp_path, damage, said
):
    files = model_files(tmp_path)
    model, description = files["model.pt2"], files["MLmodel"]
    if damage == "deleted":
        model.unlink()
    elif damage == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif damage == "garbage":
        model.write_bytes(b"not a model at all")
    else:
        description.write_text("flavors: [python_function\n")
    result = call_script("predict.py", "--model", "models:/blocks-classifier@champion", str(tiny_champion))
    [line] = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr and not result.stdout
    assert line.startswith(f"predict.py: error: models:/blocks-classifier@champion cannot be loaded: its files are "
                           f"damaged ({said}")  # fmt: skip
    [run] = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    assert line.endswith(
        f": it is version 1 of blocks-classifier; train it again: python scripts/train.py --from-run "
        f"{run.info.run_id} --register, or --model models:/blocks-classifier/VERSION for another version"
    )
    # The advice works: trained again and registered, its twin takes the alias, and reads.
    again = call_script("train.py", "--from-run", run.info.run_id, "--register")
    assert "now models:/blocks-classifier@champion" in again.stdout, again.stdout
    read = call_script("predict.py", "--model", "models:/blocks-classifier@champion", str(tiny_champion))
    assert read.returncode == 0 and read.stdout.startswith(f"{tiny_champion}: "), read.stderr


def test_predict_reads_a_read_only_store_and_creates_none_where_there_is_none(call_script, tiny_champion, tmp_path):
    store = tmp_path / "mlflow.db"
    store.chmod(0o444)
    if os.geteuid() == 0:  # root writes anywhere the file system lets it
        subprocess.run(["chattr", "+i", str(store)], check=True)
    try:
        read = call_script("predict.py", "--model", "models:/blocks-classifier@champion", str(tiny_champion))
        assert read.returncode == 0 and read.stdout.startswith(f"{tiny_champion}: "), read.stderr
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(store)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)  # the test's folder is restored after it (conftest)
    mlflow.set_tracking_uri(None)  # as in a process of its own: MLflow's default, here
    nowhere = call_script("predict.py", str(tiny_champion))
    [line] = nowhere.stderr.strip().splitlines()
    assert nowhere.returncode == 2 and "Traceback" not in nowhere.stderr
    assert line == (
        f"predict.py: error: argument --tracking-uri: there is no store '{elsewhere / 'mlflow.db'}' here: a study "
        "registers a model there"
    )
    assert list(elsewhere.iterdir()) == []  # no store made, no MLflow INFO lines said


def test_an_unlikely_answer_is_said_to_be_uncertain():
    assert answer("seven.jpg", "7", 0.912) == "seven.jpg: 7 (p=0.912)"
    assert answer("smudge.jpg", "9", 0.336) == "smudge.jpg: 9 (p=0.336, uncertain)"


@pytest.mark.slow
def test_predict_reads_photos_of_paper_in_a_shadow_and_on_a_dark_desk(champion, tmp_path):
    """Photos of paper as they come: a shadow across the page, the desk dark along two edges.
    The paper's brightness is judged around each point, and the digit is the largest stroke
    away from the edges."""
    _, folder, digits = champion
    photos = paper_photos(digits, tmp_path)
    result = run_predict(folder, *(path for path, _ in photos))
    assert result.returncode == 0, result.stderr
    read = [line.split(": ")[1].split(" (p=")[0] for line in result.stdout.strip().splitlines()]
    right = [str(label) == said for (_, label), said in zip(photos, read, strict=True)]
    assert sum(right) >= 18, list(zip(photos, read, strict=True))  # of 20


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


@contextlib.contextmanager
def serving(model_uri: str, tracking_uri: str):
    """`mlflow models serve` of ``model_uri`` on a free port, as `make serve` starts it; yields a
    function that posts a request body and returns the predictions."""
    port = free_port()
    # MLflow starts uvicorn from PATH: this environment's, as when it is activated.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
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

        def post(body: dict):
            """The predictions, or (HTTP status, message) of a refusal."""
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return json.load(response)["predictions"]
            except urllib.error.HTTPError as refused:
                return refused.code, json.load(refused)["message"]

        yield post
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_post_of_digits_with_their_scores(champion):
    _, folder, digits = champion
    with serving("models:/mnist-classifier@champion", f"sqlite:///{folder / 'mlflow.db'}") as post:
        pixels = np.stack([pixels for pixels, _ in digits])[:, None] / 255
        scores = np.array(post({"inputs": pixels.tolist()}))
    assert scores.shape == (10, 10)
    assert scores.argmax(axis=1).tolist() == [label for _, label in digits]


# A folder of one's own pictures: no Python written.

COLOURS = {"red": (210, 40, 40), "green": (40, 190, 40), "blue": (40, 60, 210), "yellow": (220, 210, 40),
           "violet": (150, 40, 200)}  # fmt: skip


def coloured_square(colour, size, rng, mode="RGB") -> Image.Image:
    """A square of ``colour`` somewhere on a grey, noisy background: what a class looks like."""
    width, height = size
    pixels = rng.normal(120, 30, (height, width, 3))
    side = max(2, min(width, height) // 2)
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    pixels[top : top + side, left : left + side] = np.array(COLOURS[colour]) + rng.normal(0, 10, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode)


def a_folder(root: Path, per_class: int, sizes, mode: str, suffix: str, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for colour in COLOURS:
        (root / colour).mkdir(parents=True)
        for i in range(per_class):
            coloured_square(colour, sizes[i % len(sizes)], rng, mode).save(root / colour / f"{i}{suffix}")
    return root


def run_repository_script(name: str, *args, cwd: Path):
    """The repository's scripts/<name>, on src/tunetrack/experiment, run in this process."""
    return call_command(ROOT / "scripts" / name, Settings, "tunetrack.experiment.search:EXPERIMENT", *args, cwd=cwd)


@pytest.mark.slow
def test_a_folder_of_colour_pictures_is_tuned_registered_read_and_served(tmp_path):
    pictures = a_folder(tmp_path / "my pictures", per_class=40, sizes=[(32, 32)], mode="RGB", suffix=".png")
    tuned = run_repository_script("tune.py", "--dataset", "folder", "--data-dir", pictures, "--n-trials", "4",
                                  "--max-epochs", "4", cwd=tmp_path)  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    assert "registered as my-pictures-classifier version 1: now models:/my-pictures-classifier@champion" in tuned.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias("my-pictures-classifier", "champion")
    assert version.tags["dataset"] == "folder" and version.tags["data_dir"] == str(pictures)

    rng = np.random.default_rng(99)  # new pictures, larger than the folder's, one of each colour
    photos = []
    for colour in COLOURS:
        photos.append(tmp_path / f"a {colour} one.jpg")
        coloured_square(colour, (96, 80), rng).save(photos[-1])
    model = "models:/my-pictures-classifier@champion"
    read = run_repository_script("predict.py", "--model", model, *photos, cwd=tmp_path)
    assert read.returncode == 0 and "Traceback" not in read.stderr, read.stderr
    answers = [line.split(": ")[1].split(" (p=")[0] for line in read.stdout.strip().splitlines()]
    assert answers == list(COLOURS)

    request = run_repository_script("predict.py", "--model", model, "--as-request", *photos, cwd=tmp_path)
    assert request.returncode == 0, request.stderr
    body = json.loads(request.stdout)
    assert np.array(body["inputs"]).shape == (5, 3, 32, 32)
    pictures_as_text = [base64.b64encode(photo.read_bytes()).decode() for photo in photos]
    nan = np.array(body["inputs"])
    nan[0, 0, 0, 0] = np.nan
    with serving(model, f"sqlite:///{tmp_path / 'mlflow.db'}") as post:
        scores = np.array(post(body))  # prepared pixels, as predict.py --as-request prints them
        answered = post({"inputs": {"image": pictures_as_text}})  # the JPEG files themselves
        as_records = post({"dataframe_records": [{"image": text} for text in pictures_as_text[:2]]})
        refusals = [post({"inputs": nan.tolist()}), post({"inputs": (np.array(body["inputs"]) * 255).tolist()}),
                    post({"inputs": {"image": ["bm90IGEgcGljdHVyZQ=="]}})]  # fmt: skip
    assert scores.shape == (5, 5) and [sorted(COLOURS)[i] for i in scores.argmax(axis=1)] == list(COLOURS)
    assert [one["class"] for one in answered] == list(COLOURS)  # by name, as predict.py says them
    for one, row in zip(answered, scores, strict=True):  # the same preparation as predict.py's (which rounds)
        assert one["scores"] == pytest.approx(row.tolist(), rel=1e-3)
        assert set(one["probabilities"]) == set(COLOURS) and one["probability"] == max(one["probabilities"].values())
    assert [one["class"] for one in as_records] == list(COLOURS)[:2]  # the same pictures, as a table's rows
    assert [status for status, _ in refusals] == [400, 400, 400]
    said = [message.rpartition("Error: ")[2] for _, message in refusals]
    assert said == ["some pixels are not numbers (NaN or infinite): pixels are numbers from 0 to 1",
                    f"pixels from {np.float32(np.min(body['inputs']) * 255):g} to "
                    f"{np.float32(np.max(body['inputs']) * 255):g}: pixels are numbers from 0 to 1",
                    "picture 0: not a picture (PNG, JPEG, ...)"]  # fmt: skip


@pytest.mark.slow
def test_a_folder_of_grey_jpegs_of_mixed_sizes_is_read_as_one_size(tmp_path):
    sizes = [(40, 30), (28, 28), (60, 45), (28, 28)]
    pictures = a_folder(tmp_path / "scans", per_class=24, sizes=sizes, mode="L", suffix=".jpg")
    tuned = run_repository_script("tune.py", "--dataset", "folder", "--data-dir", pictures, "--n-trials", "2",
                                  "--workers", "1", "--max-epochs", "4", "--model", "cnn", cwd=tmp_path)  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    card = registry.card_of("models:/scans-classifier@champion") if mlflow.set_tracking_uri(
        f"sqlite:///{tmp_path / 'mlflow.db'}") is None else None  # fmt: skip
    assert card.input_shape == (1, 28, 28) and card.classes == tuple(sorted(COLOURS))  # the usual size, grey
    photo = tmp_path / "photo.png"
    coloured_square("blue", (300, 200), np.random.default_rng(5)).save(photo)  # in colour, read in grey
    read = run_repository_script("predict.py", "--model", "models:/scans-classifier@champion", photo, cwd=tmp_path)
    assert read.returncode == 0 and read.stdout.startswith(f"{photo}: "), read.stderr
