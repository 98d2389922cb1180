"""Faults and bad input on one machine: each ends in one clear line with the right exit code,
and leaves no store created, no study changed and no MLflow run RUNNING."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import TINY_VAL, assert_flag_error, running_trial_with_run, tune_args, wait_for

STORES = ("mlflow.db", "optuna.db", "mlruns", "mlartifacts")


@pytest.fixture
def read_only_database(tmp_path):
    """An existing SQLite file that this process may not write: read-only by its mode, and, for
    root (whom modes do not stop), by the file system's immutable flag."""
    path = tmp_path / "read-only.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
    path.chmod(stat.S_IRUSR)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    yield path
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)


BAD_TRAIN = [
    *(("--lr", value) for value in ("0", "-1e-3", "nan", "inf", "fast")),
    *(("--hidden-dim", value) for value in ("0", "-3", "12.5", "nan", "100000000")),
    *(("--batch-size", value) for value in ("0", "-64", "inf")),
    *(("--weight-decay", value) for value in ("-0.01", "nan", "inf")),
    *(("--max-epochs", value) for value in ("0", "-1", "1e9")),
    *(("--seed", value) for value in ("-1", "nan")),
    *(("--val-size", value) for value in ("0", "-5", "60000")),
    ("--accelerator", "tpu9"),
    ("--data-dir", "{file}"),
    *(("--tracking-uri", v) for v in ("foo://bar", "sqlite:///{file}/mlflow.db", "sqlite:///{readonly}")),
    ("--tracking-uri", "http://127.0.0.1:9"),
    ("--experiment", " "),
]
BAD_TUNE = [
    *(("--n-trials", value) for value in ("0", "-1", "nan", "inf")),
    *(("--timeout", value) for value in ("0", "-5", "nan", "inf")),
    *(("--workers", value) for value in ("0", "-2")),
    ("--grace-period", "0"),
    *(("--study-name", value) for value in ("", "  ")),
    *(("--storage", v) for v in ("nosuchdb://x", "sqlite:///{file}/optuna.db", "sqlite:///{readonly}")),
    ("--storage", "postgresql://user:s3cret@127.0.0.1:9/optuna"),
    *(("--max-epochs", value) for value in ("two", "0")),
    ("--val-size", "60000"),
    ("--tracking-uri", "foo://bar"),
    ("--data-dir", "{file}"),
    ("--experiment", ""),
]


@pytest.mark.parametrize(
    ("script", "flag", "value"),
    [("train.py", *case) for case in BAD_TRAIN] + [("tune.py", *case) for case in BAD_TUNE],
)
def test_a_bad_value_is_one_line_that_names_its_flag_and_creates_nothing(
    run_script, tiny_data, tmp_path, read_only_database, script, flag, value
):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    before = read_only_database.read_bytes()
    value = value.format(file=a_file, readonly=read_only_database)
    result = run_script(script, "--data-dir", str(tiny_data[0]), "--val-size", str(TINY_VAL), flag, value)

    assert_flag_error(result, script, flag)
    assert "Traceback" not in result.stderr and "s3cret" not in result.stdout + result.stderr
    assert not [name for name in STORES if (tmp_path / name).exists()]
    assert read_only_database.read_bytes() == before


def test_the_messages_say_what_is_wrong(run_script, tiny_data):
    data = ["--data-dir", str(tiny_data[0]), "--val-size", str(TINY_VAL)]
    scheme = run_script("train.py", *data, "--tracking-uri", "foo://bar")
    assert "the tracking URI's scheme 'foo' is unknown" in scheme.stderr
    huge = run_script("train.py", *data, "--hidden-dim", "100000000")
    assert "100000000 needs about" in huge.stderr and "TB of memory to train" in huge.stderr
    crowd = run_script("tune.py", *data, "--workers", "100000", "--n-trials", "100000")
    assert "100000 workers need about" in crowd.stderr and "use --workers" in crowd.stderr
    secret = run_script("tune.py", *data, "--storage", "postgresql://user:s3cret@127.0.0.1:9/optuna")
    assert "postgresql://user:***@127.0.0.1:9/optuna" in secret.stderr


@pytest.mark.parametrize("script", ["train.py", "tune.py"])
def test_corrupt_mnist_is_reported_before_any_store_or_run_exists(run_script, tiny_data, tmp_path, script):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data[0], data_dir)
    victim = data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    victim.write_bytes(victim.read_bytes()[:-3])
    result = run_script(script, "--data-dir", str(data_dir), "--val-size", str(TINY_VAL))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"{script}: error: ") and "t10k-labels-idx1-ubyte is present but its MD5" in line
    assert not [name for name in STORES if (tmp_path / name).exists()]


def test_a_continuation_with_other_settings_is_refused_and_changes_nothing(run_script, tiny_data, tmp_path):
    data_dir, _ = tiny_data
    first = run_script("tune.py", *tune_args(data_dir, "--n-trials", "1", "--workers", "1", "--max-epochs", "2"))
    assert first.returncode == 0, first.stderr
    stores = {name: (tmp_path / name).read_bytes() for name in ("optuna.db", "mlflow.db")}

    other = run_script("tune.py", *tune_args(data_dir, "--n-trials", "1", "--workers", "1", "--max-epochs", "3"))
    assert_flag_error(other, "tune.py", "--max-epochs")
    assert "trains every trial with max_epochs=2, not 3" in other.stderr and "--study-name" in other.stderr
    assert {name: (tmp_path / name).read_bytes() for name in stores} == stores
    # The parent run records the settings that define the study.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [parent] = client.search_runs(["1"], "tags.`optuna.study` = 'mnist' AND tags.`mlflow.runName` = 'mnist'")
    assert parent.data.params["max_epochs"] == "2" and parent.data.params["val_size"] == str(TINY_VAL)


def test_a_tracking_store_that_lost_its_runs_is_said_and_the_study_goes_on(run_script, tiny_data, tmp_path):
    data_dir, _ = tiny_data
    args = tune_args(data_dir, "--n-trials", "1", "--workers", "1", "--max-epochs", "2")
    assert run_script("tune.py", *args).returncode == 0
    (tmp_path / "mlflow.db").unlink()
    shutil.rmtree(tmp_path / "mlruns")

    again = run_script("tune.py", *args)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert "has no run of study 'mnist'" in again.stdout and "a new parent run starts there" in again.stdout
    assert "test evaluation skipped: the best trial, trial " in again.stdout  # unless the new trial is best
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 2  # a parent and the new trial


def test_a_new_study_beside_an_older_one_of_the_same_name_is_told_apart(run_script, tiny_data, tmp_path):
    data_dir, _ = tiny_data
    args = tune_args(data_dir, "--n-trials", "1", "--workers", "1", "--max-epochs", "2")
    assert run_script("tune.py", *args).returncode == 0
    (tmp_path / "optuna.db").unlink()

    again = run_script("tune.py", *args)
    assert again.returncode == 0, again.stderr
    uid = optuna.load_study(study_name="mnist", storage=f"sqlite:///{tmp_path / 'optuna.db'}").user_attrs["uid"]
    note = "a new study 'mnist' began beside 1 older one(s) of the same name in this MLflow experiment"
    assert again.stdout.count(note) == 2  # when it begins, and in the summary
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    new = [r for r in runs if r.data.tags.get("optuna.study_uid") == uid]
    assert sorted(r.data.tags["mlflow.runName"] for r in new) == [f"mnist ({uid[:8]})", "trial 0"]
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}


def test_ctrl_c_prints_a_line_per_interrupted_trial_and_the_summary_only(run_script, tiny_data, tmp_path):
    data_dir, _ = tiny_data
    process = run_script(
        "tune.py",
        *tune_args(data_dir, "--n-trials", "4", "--workers", "2", "--max-epochs", "400", "--no-pruning"),
        background=True,
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    wait_for(lambda: len([t for t in optuna.load_study(study_name="mnist", storage=storage).trials
                          if "mlflow_run_id" in t.user_attrs]) == 2 if (tmp_path / "optuna.db").exists() else None,
             what="both workers' trials")  # fmt: skip
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(process.pid, signal.SIGINT)  # a second, impatient Ctrl-C
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1].startswith("tune.py: error: interrupted")
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "Trial 0 failed" not in stderr
    assert stdout.count(" FAIL ") == 2 and stdout.count("interrupted") == 2  # one line per trial
    assert "study 'mnist': 2 trials, 0 complete, 0 pruned, 2 failed" in stdout


def test_timeout_counts_from_the_start_and_every_worker_trains_once(run_script, tiny_data, tmp_path):
    data_dir, _ = tiny_data
    result = run_script("tune.py", *tune_args(data_dir, "--n-trials", "6", "--workers", "2", "--timeout", "1"))
    assert result.returncode == 0, result.stderr
    trials = optuna.load_study(study_name="mnist", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert len(trials) == 2 and len({t.user_attrs["worker"]["pid"] for t in trials}) == 2


def test_no_more_workers_start_than_there_are_trials(run_script, tiny_data, tmp_path):
    data_dir, _ = tiny_data
    result = run_script("tune.py", *tune_args(data_dir, "--n-trials", "1", "--workers", "3", "--max-epochs", "1"))
    assert result.returncode == 0 and result.stderr.count("warning") == 0, result.stderr
    [trial] = optuna.load_study(study_name="mnist", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert trial.user_attrs["worker"]["pid"] != 0


NASTY_NAME = "a'b\"c"  # both quotes: no MLflow filter string can hold it


def test_random_kills_never_lose_a_trial_nor_leave_a_run_running(run_script, tiny_data, tmp_path):
    """Kill a worker or the whole process group with SIGKILL at seeded random moments, and run the
    same study again, until as many trials completed as asked; then every record must agree."""
    wanted, rng = 6, random.Random(20261128)
    data_dir, _ = tiny_data
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    base = tune_args(data_dir, "--study-name", NASTY_NAME, "--workers", "2", "--max-epochs", "3", "--no-pruning")
    base += ["--grace-period", "2"]  # a trial killed before its worker named itself is failed soon after
    kills, outputs = 0, []
    while True:
        done = 0
        if (tmp_path / "optuna.db").exists():
            trials = optuna.load_study(study_name=NASTY_NAME, storage=storage).trials
            done = sum(t.state == TrialState.COMPLETE for t in trials)
        if done == wanted:
            break
        process = run_script("tune.py", *base, "--n-trials", str(wanted - done), background=True)
        if kills < 3:
            wait_for(lambda: running_trial_with_run(storage), what="a running trial")
            time.sleep(rng.uniform(0, 1.5))
            workers = [int(pid) for pid in os.popen(f"pgrep -P {process.pid} -f spawn_main").read().split()]
            if rng.random() < 0.5 and workers:
                os.kill(rng.choice(workers), signal.SIGKILL)  # one worker; tune.py and the other go on
            else:
                os.killpg(process.pid, signal.SIGKILL)  # the machine, as it were
            kills += 1
        stdout, stderr = process.communicate(timeout=300)
        outputs.append(stdout)
        assert "Traceback" not in stderr, stderr
    assert kills == 3

    study = optuna.load_study(study_name=NASTY_NAME, storage=storage)
    trials = study.trials
    assert len({t.number for t in trials}) == len(trials)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == wanted
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(["1"])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["optuna.study"] == NASTY_NAME
    by_trial: dict[int, list] = {}
    for run in runs:
        if "optuna.trial" in run.data.tags:
            by_trial.setdefault(int(run.data.tags["optuna.trial"]), []).append(run)
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            [run] = by_trial[trial.number]
            assert run.info.status == "FINISHED"
            history = client.get_metric_history(run.info.run_id, "val_loss")
            assert [m.step for m in history] == [0, 1, 2]
        else:
            assert all(run.info.status in ("KILLED", "FAILED") for run in by_trial.get(trial.number, []))
    assert any("was left running by a process that is gone: marked FAIL" in out for out in outputs)
