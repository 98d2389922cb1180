"""Where people keep their work, for real: a folder whose name has a space or a letter outside
ASCII, a folder that moves, a study continued from another folder, output that goes nowhere, a
disk that fills, another writer holding the store. Each ends in one line that says what to do,
or not at all, and the next run works."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import threading

import optuna
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import TINY_SCRIPTS, env_with_tiny, grow, tune_args
from tunetrack.machinery.study import results

pytestmark = pytest.mark.slow


def runs_of(folder) -> list:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]


def lines_of(stderr: str) -> list[str]:
    """What a script said on stderr, less its progress bar (redrawn after a carriage return; its
    rate reads trial/s or, on a slow machine, s/trial)."""
    bar = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and not bar.search(line)]


def test_a_folder_whose_name_has_a_space_and_an_accent_is_a_folder_like_any(call_script, tiny_data, tmp_path):
    folder = tmp_path / "My Projects" / "résultats"
    folder.mkdir(parents=True)
    for script, args in (("train.py", ["--register"]), ("tune.py", ["--n-trials", "2", "--workers", "1"])):
        result = call_script(script, *args, "--data-dir", str(tiny_data), cwd=folder)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    picture = folder / "block.png"
    Image.new("L", (32, 32), 90).save(picture)
    read = call_script("predict.py", "--model", "models:/blocks-classifier@champion", str(picture), cwd=folder)
    assert read.returncode == 0 and read.stdout.startswith(f"{picture}: "), read.stderr
    assert {run.info.status for run in runs_of(folder)} == {"FINISHED"}
    # Nothing beside it: no percent-encoded twin (My%20Projects, r%C3%A9sultats) made of its name.
    assert [p.name for p in (tmp_path / "My Projects").iterdir()] == ["résultats"]
    assert "My Projects" in [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob("*%*"))


def test_a_folder_that_moved_keeps_its_champion_its_checkpoints_and_its_study(call_script, tiny_data, tmp_path):
    origin = tmp_path / "orig"
    origin.mkdir()
    first = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "2", "--workers", "1"), cwd=origin)
    assert first.returncode == 0, first.stderr
    moved = tmp_path / "renamed"
    origin.rename(moved)

    picture = moved / "block.png"
    Image.new("L", (32, 32), 90).save(picture)
    read = call_script("predict.py", "--model", "models:/blocks-classifier@champion", str(picture), cwd=moved)
    assert read.returncode == 0 and read.stdout.startswith(f"{picture}: "), read.stderr
    assert read.stderr == f"this folder was {origin}: MLflow's records of where its artifacts are now name {moved}\n"
    again = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--workers", "1"), cwd=moved)
    assert again.returncode == 0, again.stderr
    assert "test (the best trial's weights, evaluated once)" in again.stdout and "no checkpoint" not in again.stdout
    assert not origin.exists(), sorted(str(p) for p in origin.rglob("*"))  # nothing written where the folder was
    client = MlflowClient(f"sqlite:///{moved / 'mlflow.db'}")
    for run in runs_of(moved):  # every artifact where mlflow ui (a server reading these records) finds it
        assert run.info.artifact_uri.startswith(str(moved)), run.info.artifact_uri
        assert client.list_artifacts(run.info.run_id), run.info.run_name
    [parent] = [run for run in runs_of(moved) if "mlflow.parentRunId" not in run.data.tags]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} >= {"plots/slice.png"}


def test_a_study_continued_from_another_folder_keeps_its_runs_in_its_own_store(call_script, tiny_data, tmp_path):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir(), elsewhere.mkdir()
    assert call_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--workers", "1"), cwd=home).returncode == 0
    args = tune_args(tiny_data, "--n-trials", "1", "--workers", "1", "--storage", "sqlite:///../home/optuna.db")
    again = call_script("tune.py", *args, cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    assert f"study 'blocks-dense' keeps its MLflow runs in sqlite:///{home / 'mlflow.db'}: so does this" in again.stdout
    assert list(elsewhere.iterdir()) == []  # no second store, no second parent run
    runs = runs_of(home)
    assert len([run for run in runs if "mlflow.parentRunId" not in run.data.tags]) == 1 and len(runs) == 3
    assert {run.info.status for run in runs} == {"FINISHED"} and "models:/blocks-classifier@champion" in again.stdout


@pytest.mark.parametrize("nowhere", ["a pipe closed early", "a full device"])
def test_output_that_goes_nowhere_costs_lines_never_the_study(tiny_data, tmp_path, nowhere):
    command = [sys.executable, str(TINY_SCRIPTS / "tune.py"), *tune_args(tiny_data, "--n-trials", "3")]
    env = {**os.environ, **env_with_tiny()}
    if nowhere == "a pipe closed early":  # tune.py | head -3
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3):
            process.stdout.readline()
        process.stdout.close()
        stderr = process.stderr.read().decode()
        code = process.wait(timeout=300)
    else:  # tune.py > /dev/full
        with open("/dev/full", "w") as full:
            done = subprocess.run(command, cwd=tmp_path, env=env, stdout=full, stderr=subprocess.PIPE, timeout=300)
        code, stderr = done.returncode, done.stderr.decode()
    assert code == 0 and "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    [parent] = [run for run in runs_of(tmp_path) if "mlflow.parentRunId" not in run.data.tags]
    assert parent.info.status == "FINISHED" and "test_acc" in parent.data.metrics
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert int(client.get_model_version_by_alias("blocks-classifier", "champion").version) == 1


def test_another_writer_holding_the_store_is_waited_for_in_one_line(call_script, tiny_data, tmp_path):
    """A sqlite3 shell in BEGIN IMMEDIATE on mlflow.db: each call MLflow makes waits its busy
    timeout out, fails, and is made again; the study says once that it waits, and goes on once
    the writer lets go."""
    env = {**os.environ, **env_with_tiny()}
    assert call_script("train.py", "--data-dir", str(tiny_data)).returncode == 0  # the store, made
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    command = [
        sys.executable,
        str(TINY_SCRIPTS / "tune.py"),
        *tune_args(tiny_data, "--n-trials", "2", "--workers", "1"),
    ]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    said = []

    def read_stderr():
        for line in process.stderr:
            said.append(line)
            if "is locked by another writer: waiting for it" in line:
                holder.execute("COMMIT")  # it waited through one busy timeout: let it go on

    reader = threading.Thread(target=read_stderr)
    reader.start()
    stdout = process.stdout.read()
    code = process.wait(timeout=300)
    reader.join()
    with contextlib.suppress(sqlite3.OperationalError):
        holder.execute("COMMIT")  # had it never said so
    holder.close()
    lines = lines_of("".join(said))
    assert code == 0 and "study 'blocks-dense': 2 trials, 2 complete" in stdout, "".join(said)
    assert lines == [f"sqlite:///{tmp_path / 'mlflow.db'} is locked by another writer: waiting for it"], lines


def test_a_disk_that_fills_as_a_store_is_first_made_leaves_no_half_made_store(run_script, tiny_data, small_disk):
    full = run_script("train.py", "--data-dir", str(tiny_data), cwd=small_disk)
    [line] = full.stderr.strip().splitlines()
    assert full.returncode == 2 and "Traceback" not in full.stderr
    assert line.endswith("database or disk is full: free some space on its disk, and run again"), line
    assert sorted(path.name for path in small_disk.iterdir()) == []  # no store half made: none at all
    grow(small_disk, "50m")
    again = run_script("train.py", "--data-dir", str(tiny_data), cwd=small_disk)
    assert again.returncode == 0, again.stderr
    assert {run.info.status for run in runs_of(small_disk)} == {"FINISHED"}


def test_a_disk_that_fills_as_the_best_model_is_logged_is_one_line_and_the_next_run_works(
    call_script, tiny_data, small_disk, monkeypatch
):
    grow(small_disk, "50m")
    monkeypatch.chdir(small_disk)
    evaluate = results.evaluate_best_trial
    filler = small_disk / "filler"

    def with_the_disk_full(*args, **kwargs):  # the trials are done: the disk fills
        with open(filler, "wb") as handle, contextlib.suppress(OSError):
            while True:
                handle.write(bytes(1 << 16))
                handle.flush()
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(results, "evaluate_best_trial", with_the_disk_full)
    full = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "2", "--workers", "1"))
    [line] = lines_of(full.stderr)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert (
        line
        == "tune.py: error: the disk is full: free some space and run the same command again (what finished is kept)"
    )
    filler.unlink()
    monkeypatch.setattr(results, "evaluate_best_trial", evaluate)
    again = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--workers", "1"))
    assert again.returncode == 0 and "registered as blocks-classifier version 1" in again.stdout, again.stderr
    assert {run.info.status for run in runs_of(small_disk)} == {"FINISHED"}  # what stayed open is closed
    client = MlflowClient(f"sqlite:///{small_disk / 'mlflow.db'}")
    models = client.search_logged_models([e.experiment_id for e in client.search_experiments()])
    assert {model.status.name for model in models} <= {"READY", "FAILED"}
    for model in models:  # every model file there is whole: a model cut off has none
        files = list(small_disk.glob(f"mlruns/*/models/{model.model_id}/artifacts/data/model.pt2"))
        assert (model.status.name == "READY") == bool(files), model
    study = optuna.load_study(study_name="blocks-dense", storage=f"sqlite:///{small_disk / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
