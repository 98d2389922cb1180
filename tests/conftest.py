"""Fixtures: tiny synthetic data sets in the real file formats, temporary MLflow stores, and
ways to run the scripts as a user would (in a process of their own) or quickly (in this one)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from experiment.data import DATASETS
from experiment.search import EXPERIMENT
from experiment.settings import Settings
from machinery.files import md5_of
from machinery.idx import write_idx
from machinery.options import TuneOptions
from machinery.stores import create_once
from machinery.tracking import connect

ROOT = Path(__file__).resolve().parents[1]
# Where the real MNIST is kept: the same folder `make train` uses, so it is fetched once.
REAL_DATA_DIR = ROOT / "data"

TINY_TRAIN, TINY_TEST, TINY_VAL = 600, 200, 100
STUDY_EPOCHS = 2  # per trial, in the tests' studies


def tiny_images(count: int, seed: int, pattern: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Images a small network learns in a few epochs, but not perfectly: one fixed random pattern
    of 4x4 blocks per class (shapes, for a CNN too), at a random brightness, under heavy noise."""
    templates = np.kron(np.random.default_rng(pattern).random((10, 7, 7)) > 0.8, np.ones((4, 4))) > 0
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    brightness = rng.uniform(30, 90, (count, 1, 1))
    noise = rng.normal(60, 90, (count, 28, 28))
    images = np.clip(templates[labels] * brightness + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


def write_tiny(data_dir: Path, dataset: str = "mnist") -> dict[str, str]:
    """Write a data set's four files, tiny, in its real format (compressed where its are);
    return their MD5s, as the data set's ``files`` lists the real ones."""
    kind = DATASETS[dataset]
    raw = Path(data_dir) / kind.folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    train_images, train_labels, test_images, test_labels = kind.files
    pattern = 1234 + list(DATASETS).index(dataset)  # each data set its own classes
    for images_file, labels_file, count, seed in ((train_images, train_labels, TINY_TRAIN, 0),
                                                  (test_images, test_labels, TINY_TEST, 1)):  # fmt: skip
        images, labels = tiny_images(count, seed, pattern)
        write_idx(raw / images_file, images)
        write_idx(raw / labels_file, labels)
    return {name: md5_of(raw / name) for name in kind.files}


@pytest.fixture(autouse=True)
def _in_a_folder_of_its_own(tmp_path, monkeypatch):
    """Every test works in its temporary folder, with MLflow's own default store there: MLflow
    puts a SQLite store's artifacts in ./mlruns, which would otherwise be the repository's. A
    tracking URI that an earlier test set through MLflow's fluent API (logging a model does)
    is forgotten."""
    mlflow.set_tracking_uri(None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]]]:
    """A data folder with every built-in data set, tiny, and their MD5s by data set."""
    data_dir = tmp_path_factory.mktemp("tiny-data")
    return data_dir, {dataset: write_tiny(data_dir, dataset) for dataset in DATASETS}


@pytest.fixture
def tiny_files(tiny_data, monkeypatch) -> Path:
    """The tiny data sets' folder, their MD5s standing in for the official ones in this process."""
    data_dir, md5s = tiny_data
    for dataset, files in md5s.items():
        monkeypatch.setattr(DATASETS[dataset], "files", files)
    return data_dir


@pytest.fixture
def tiny_settings(tiny_files) -> Settings:
    """The default settings, on the tiny data, for as many epochs as the tests' studies train."""
    return Settings(data_dir=str(tiny_files), val_size=TINY_VAL, max_epochs=STUDY_EPOCHS)


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def study_env(tiny_settings, tmp_path):
    """``tune_here(study_name, n_trials, settings changes..., options=dict(...))``: a study in this
    process on the tiny data, against SQLite stores in the test's folder; it returns tune()'s
    result, and ``tune_here.tracker`` is the store."""
    from machinery.tuning import tune

    tracker = connect(f"sqlite:///{tmp_path / 'mlflow.db'}", "tune-tests")

    def tune_here(study_name: str, n_trials: int, options: dict | None = None, **changes):
        settings = dataclasses.replace(tiny_settings, **changes)
        chosen = TuneOptions(n_trials=n_trials, workers=1, accelerator="cpu", study_name=study_name,
                             storage=f"sqlite:///{tmp_path / 'optuna.db'}", **(options or {}))  # fmt: skip
        return tune(EXPERIMENT, settings, chosen.resolved(settings), lambda: tracker)

    tune_here.tracker = tracker
    tune_here.storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    return tune_here


def files_env(md5s: dict[str, dict[str, str]]) -> dict[str, str]:
    """The environment that makes a process started by the tests take the tiny data sets' MD5s
    (tests/site/sitecustomize.py)."""
    return {
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "site"), os.environ.get("PYTHONPATH", "")]),
        "EXPERIMENT_TEST_FILES": json.dumps(md5s),
    }


@pytest.fixture
def run_script(tiny_data, tmp_path):
    """Run scripts/<name> in a subprocess, as a user would: in ``cwd`` (a temporary working
    directory by default, so MLflow's default store is <tmp_path>/mlflow.db), and, with
    ``hostname``, as if on another machine (its own UTS namespace, so another host name). With
    ``background``, return the Popen, in a session of its own to be signalled as a terminal
    would; with ``namespace``, in that network namespace. Every Python process it starts,
    spawned workers included, takes the tiny data sets' MD5s for the official ones."""
    _, md5s = tiny_data

    def run(name: str, *args: str, timeout: float = 300, background: bool = False, cwd=None, hostname=None,
            env: dict | None = None, namespace=None):  # fmt: skip
        environment = {**os.environ, **files_env(md5s)}
        for variable, value in (env or {}).items():  # a PYTHONPATH of the test's goes first
            environment[variable] = value + os.pathsep + environment[variable] if variable == "PYTHONPATH" else value
        environment.pop("MLFLOW_TRACKING_URI", None)
        command = [sys.executable, str(ROOT / "scripts" / name), *args]
        if hostname:
            command = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *command]
        if namespace:  # a host of its own on a network of its own (workbench.servers.Namespace)
            command = namespace.command(*command)
        where = cwd or tmp_path
        if background:
            return subprocess.Popen(
                command, cwd=where, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True,
            )  # fmt: skip
        return subprocess.run(command, cwd=where, env=environment, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def call_script(tiny_files):
    """Run scripts/<name>'s main() in this process, its output captured: what a user would see,
    in a fraction of the time (no interpreter, no imports). Returns what ``run_script`` does."""

    def call(name: str, *args: str) -> subprocess.CompletedProcess:
        spec = importlib.util.spec_from_file_location(f"script_{Path(name).stem}", ROOT / "scripts" / name)
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        out, err, argv = io.StringIO(), io.StringIO(), sys.argv
        sys.argv = [str(ROOT / "scripts" / name), *args]  # argparse names the script after it
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = script.main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        finally:
            sys.argv = argv
        return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())

    return call


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


def worker_pids(tune_pid: int) -> list[int]:
    """The worker processes of a tune.py: the forks of its fork server (machinery.forking)."""

    def children(pid: int, pattern: str = "") -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(pid), *(["-f", pattern] if pattern else [])], capture_output=True)
        return [int(child) for child in found.stdout.split()]

    return [worker for server in children(tune_pid, "forkserver") for worker in children(server)]


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
    """tune.py's flags for a study on the tiny data, and ``extra``."""
    return ["--data-dir", str(data_dir), "--val-size", str(TINY_VAL), "--accelerator", "cpu", *extra]
