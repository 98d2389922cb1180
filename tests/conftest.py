"""Fixtures: a tiny synthetic MNIST in the real IDX format, temporary MLflow stores, and a way
to run the scripts as a user would."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from mnist_hpo import mnist_files
from mnist_hpo.config import TrainConfig
from mnist_hpo.mnist_files import md5_of, raw_dir, write_idx_images, write_idx_labels
from mnist_hpo.stores import create_once
from mnist_hpo.tracking import connect

ROOT = Path(__file__).resolve().parents[1]
# Where the real MNIST is kept: the same folder `make train` uses, so it is fetched once.
REAL_DATA_DIR = ROOT / "data"

TINY_TRAIN, TINY_TEST, TINY_VAL = 600, 200, 100
STUDY_EPOCHS = 2  # per trial, in the tests' studies
STUDY_BASE = TrainConfig(max_epochs=STUDY_EPOCHS, val_size=TINY_VAL)


def tiny_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits a small network learns in a few epochs, but not perfectly: one fixed random stroke
    pattern per class, at a random brightness, under heavy noise."""
    templates = np.random.default_rng(1234).random((10, 28, 28)) > 0.9
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    brightness = rng.uniform(30, 90, (count, 1, 1))
    noise = rng.normal(60, 90, (count, 28, 28))
    images = np.clip(templates[labels] * brightness + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


def write_tiny_mnist(data_dir: Path) -> dict[str, str]:
    """Write the four IDX files; return their MD5s, as MNIST_MD5 lists the real ones."""
    raw = raw_dir(data_dir)
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count, seed in (("train", TINY_TRAIN, 0), ("t10k", TINY_TEST, 1)):
        images, labels = tiny_images(count, seed)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return {name: md5_of(raw / name) for name in mnist_files.MNIST_MD5}


@pytest.fixture(autouse=True)
def _in_a_folder_of_its_own(tmp_path, monkeypatch):
    """Every test works in its temporary folder: MLflow puts a SQLite store's artifacts in
    ./mlruns, which would otherwise be the repository's."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    data_dir = tmp_path_factory.mktemp("tiny-mnist")
    return data_dir, write_tiny_mnist(data_dir)


@pytest.fixture
def tiny_mnist(tiny_data, monkeypatch) -> Path:
    """The tiny data set's folder, with its MD5s standing in for the official ones."""
    data_dir, md5s = tiny_data
    for name, md5 in md5s.items():
        monkeypatch.setitem(mnist_files.MNIST_MD5, name, md5)
    return data_dir


@pytest.fixture
def study_env(tiny_mnist, tmp_path):
    """A tracker, a storage URL and the tune() settings for a study on the tiny data."""
    tracker = connect(f"sqlite:///{tmp_path / 'mlflow.db'}", "tune-tests")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    settings = dict(data_dir=str(tiny_mnist), base=STUDY_BASE, accelerator="cpu")
    return tracker, storage, settings


def with_base(settings: dict, **changes) -> dict:
    """The study settings of ``study_env`` with some of the trials' TrainConfig changed."""
    return {**settings, "base": dataclasses.replace(settings["base"], **changes)}


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def run_script(tiny_data, tmp_path):
    """Run scripts/<name> in a subprocess, as a user would: in ``cwd`` (a temporary working
    directory by default, so MLflow's default store is <tmp_path>/mlflow.db), and, with
    ``hostname``, as if on another machine (its own UTS namespace, so another host name). With
    ``background``, return the Popen, in a session of its own to be signalled as a terminal
    would.

    tests/site/sitecustomize.py, imported by every Python process started this way (spawned
    workers included), puts the tiny data set's MD5s in place of the official ones.
    """
    _, md5s = tiny_data

    def run(name: str, *args: str, timeout: float = 300, background: bool = False, cwd=None, hostname=None):
        env = {
            **{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "site"), os.environ.get("PYTHONPATH", "")]),
            "MNIST_HPO_TEST_MD5": json.dumps(md5s),
        }
        command = [sys.executable, str(ROOT / "scripts" / name), *args]
        if hostname:
            command = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *command]
        where = cwd or tmp_path
        if background:
            return subprocess.Popen(
                command, cwd=where, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True,
            )  # fmt: skip
        return subprocess.run(command, cwd=where, env=env, capture_output=True, text=True, timeout=timeout)

    return run


def assert_flag_error(result: subprocess.CompletedProcess, script: str, flag: str) -> None:
    """The script refused a value: exit status 2 and one line on stderr that names the flag."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: argument {flag}"), result.stderr


def wait_for(condition, timeout: float = 120, what: str = "condition", process: subprocess.Popen | None = None):
    """Poll ``condition`` until it returns something true; return that. With ``process``, fail
    at once, with what it said, if it ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := condition():
            return value
        if process is not None and process.poll() is not None:
            stdout, stderr = process.communicate()
            raise AssertionError(
                f"it ended (code {process.returncode}) before {what}:\n{stdout[-2000:]}\n{stderr[-2000:]}"
            )
        time.sleep(0.2)
    said = ""
    if process is not None:  # what it said so far tells why it never got there
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        said = f":\n{stdout[-2000:]}\n{stderr[-2000:]}"
    raise AssertionError(f"timed out waiting for {what}{said}")


def read_trials(storage: str, study_name: str | None = None) -> list:
    """The trials of ``study_name`` (or of the only study) in ``storage``, as a study that runs
    elsewhere has them now; [] while it has none. It never makes the storage's tables, and it
    opens the storage as tune.py does, through create_once: opening writes Optuna's version
    rows even so, which raced a tune.py starting on the same empty SQLite file."""
    reader = None
    try:
        reader = create_once(storage, lambda: optuna.storages.RDBStorage(storage, skip_table_creation=True))
        if study_name is None:
            [summary] = optuna.get_all_study_summaries(reader)
            study_name = summary.study_name
        return optuna.load_study(study_name=study_name, storage=reader).trials
    except Exception:  # noqa: BLE001 - no file, no tables, no study yet: all mean "not yet"
        return []
    finally:
        # Polled several times a second: each undisposed engine kept a connection open, and a
        # test's PostgreSQL refused the study's own ("too many clients already").
        if reader is not None:
            reader.engine.dispose()


def running_trial_with_run(storage: str):
    """A RUNNING trial of the only study in ``storage`` that has its MLflow run, if there is one."""
    trials = read_trials(storage)
    return next((t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs), None)


def tune_args(data_dir, *extra: str) -> list[str]:
    """tune.py's flags for a study on the tiny data set, and ``extra``."""
    return ["--data-dir", str(data_dir), "--val-size", str(TINY_VAL), "--accelerator", "cpu", *extra]
