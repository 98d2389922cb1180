"""Fixtures: the tests' own tiny experiment (tests/tiny) and its data, temporary MLflow stores,
and ways to run its scripts as a user would (in a process of their own) or quickly (in this one).

The machinery's tests train, tune and register the tiny experiment, never src/tunetrack/experiment: a
user who makes src/tunetrack/experiment theirs keeps them as they are. The shipped experiment's own
tests are in test_experiment.py."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking._tracking_service.utils import _artifact_repos_cache as artifact_repositories
from optuna.trial import TrialState

from tiny import experiment as tiny
from tiny.settings import TinySettings
from tunetrack.machinery.options import TuneOptions
from tunetrack.machinery.tracking.mlflow_runs import connect
from tunetrack.machinery.tracking.stores import create_once

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
# Where the real MNIST is kept: the same folder `make train` uses, so it is fetched once.
REAL_DATA_DIR = ROOT / "data"

TINY_TRAIN, TINY_TEST, TINY_VAL = tiny.TRAIN, tiny.TEST, TinySettings.val_size
STUDY_EPOCHS = TinySettings.max_epochs  # per trial, in the tests' studies
TINY = tiny.EXPERIMENT
TINY_SCRIPTS = TESTS / "tiny" / "scripts"


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
def tiny_data(tmp_path_factory) -> Path:
    """A data folder with every data set of the tiny experiment, its files there as a user's
    would be (written as its source writes them)."""
    data_dir = tmp_path_factory.mktemp("tiny-data")
    for kind in tiny.DATASETS.values():
        raw = kind(TinySettings(data_dir=str(data_dir))).raw
        raw.mkdir(parents=True)
        for source in kind.sources:
            source.fetch(raw)
    return data_dir


@pytest.fixture
def tiny_settings(tiny_data) -> TinySettings:
    """The tiny experiment's default settings, on its data."""
    return TinySettings(data_dir=str(tiny_data))


@pytest.fixture(scope="session")
def new_mlflow_db(tmp_path_factory) -> Path:
    """A new MLflow store, its tables made: a copy stands for a store made anew, in a fraction of
    the seconds that MLflow's migrations take for each."""
    path = tmp_path_factory.mktemp("new-store") / "mlflow.db"
    mlflow.tracking.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, new_mlflow_db) -> str:
    """A new MLflow store in the test's folder (MLflow's default store, there)."""
    shutil.copy(new_mlflow_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def study_env(tiny_settings, tmp_path, tracking_uri):
    """``tune_here(study_name, n_trials, settings changes..., options=dict(...))``: a study in this
    process on the tiny experiment, against SQLite stores in the test's folder; it returns
    tune()'s result, and ``tune_here.tracker`` is the store."""
    from tunetrack.machinery.study.tuning import tune

    tracker = connect(tracking_uri, "tune-tests")

    def tune_here(study_name: str, n_trials: int, options: dict | None = None, **changes):
        settings = dataclasses.replace(tiny_settings, **changes)
        # No repeats and no baseline unless a test asks: they have tests of their own.
        chosen = TuneOptions(n_trials=n_trials, accelerator="cpu", study_name=study_name,
                             storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                             **{"workers": 1, "repeats": 0, "baseline": "none", **(options or {})})  # fmt: skip
        return tune(TINY, settings, chosen.resolved(settings), lambda: tracker)

    tune_here.tracker = tracker
    tune_here.storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    return tune_here


def env_with_tiny() -> dict[str, str]:
    """The environment that lets a process started by the tests import the tiny experiment."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")]))}


@pytest.fixture
def run_script(tmp_path):
    """Run the tiny experiment's <name> (tests/tiny/scripts: train.py, tune.py, predict.py, each
    the repository's command handed that experiment) in a subprocess, as a user would: in
    ``cwd`` (a temporary working directory by default, so MLflow's default store is
    <tmp_path>/mlflow.db), and, with ``hostname``, as if on another machine (its own UTS
    namespace, so another host name). With ``background``, return the Popen, in a session of
    its own to be signalled as a terminal would; with ``namespace``, in that network namespace."""

    def run(name: str, *args: str, timeout: float = 300, background: bool = False, cwd=None, hostname=None,
            env: dict | None = None, namespace=None):  # fmt: skip
        environment = {**os.environ, **env_with_tiny()}
        for variable, value in (env or {}).items():  # a PYTHONPATH of the test's goes first
            environment[variable] = value + os.pathsep + environment[variable] if variable == "PYTHONPATH" else value
        environment.pop("MLFLOW_TRACKING_URI", None)
        command = [sys.executable, str(TINY_SCRIPTS / name), *args]
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


def call_command(script: Path, settings: type, experiment: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """Run the command that ``script`` (a train.py, tune.py or predict.py) runs, for ``settings``
    and ``experiment``, in this process, its output captured: what a user would see, in a
    fraction of the time (no interpreter, no imports). Returns what ``run_script`` does."""
    command = importlib.import_module(f"tunetrack.machinery.commands.{script.stem}")
    args = [str(arg) for arg in args]
    out, err, argv, here = io.StringIO(), io.StringIO(), sys.argv, Path.cwd()
    sys.argv = [str(script), *args]  # argparse names the script after it
    mlflow.set_tracking_uri(None)  # as in a new process: no URI set by an earlier call, and
    artifact_repositories.clear()  # no run's artifact location remembered from one
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = command.main(f"{script.name}.", settings, experiment, args)
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = argv
        os.chdir(here)
        mlflow.set_tracking_uri(None)
    return subprocess.CompletedProcess([script.name, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def call_script(tiny_data):
    """``call(name, *args, cwd=None)``: the tiny experiment's <name> run by ``call_command``."""

    def call(name: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
        return call_command(TINY_SCRIPTS / name, TinySettings, "tiny.experiment:EXPERIMENT", *args, cwd=cwd)

    return call


def imported_modules(stderr: str) -> set[str]:
    """The modules a process run with ``python -X importtime`` imported, from its stderr."""
    lines = [line for line in stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}  # the first is the table's header


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
    """The worker processes of a tune.py: the forks of its fork server (machinery.study.fork_server)."""

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
    """tune.py's flags for a study on the tiny data, and ``extra``: no repeats and no baseline,
    which have tests of their own (test_objectives.py)."""
    return ["--data-dir", str(data_dir), "--accelerator", "cpu", "--repeats", "0", "--baseline", "none", *extra]


@pytest.fixture
def small_disk(tmp_path):
    """A file system of 500 KB of its own (a tmpfs), where the test can mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=500k", "tmpfs", str(disk)], capture_output=True
    )
    if not mounted or mounted.returncode != 0:
        pytest.skip("a size-limited file system needs root and mount (a tmpfs of its own)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def grow(disk, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)
