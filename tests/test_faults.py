"""Faults and bad input on one machine: each ends in one clear line with the right exit code,
and leaves no store created, no study changed and no MLflow run RUNNING."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import weakref

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import (
    ROOT,
    TINY,
    TINY_TRAIN,
    TINY_VAL,
    assert_flag_error,
    imported_modules,
    read_trials,
    running_trial_with_run,
    tune_args,
    wait_for,
    worker_pids,
)
from tiny import experiment as tiny
from tiny.settings import TinySettings
from tunetrack.machinery.cli import flags
from tunetrack.machinery.options import TuneOptions
from tunetrack.machinery.runtime import interrupts
from tunetrack.machinery.study.tuning import tune
from tunetrack.machinery.tracking.mlflow_runs import connect

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
    *(("--width", value) for value in ("0", "-3", "12.5", "nan", "10000000000")),
    *(("--batch-size", value) for value in ("0", "-64", "inf")),
    *(("--clip", value) for value in ("0", "-0.01", "nan", "inf")),
    *(("--max-epochs", value) for value in ("0", "-1", "1e9")),
    *(("--seed", value) for value in ("-1", "nan")),
    *(("--val-size", value) for value in ("0", "-5", str(TINY_TRAIN + 100))),  # the last: more than the data
    ("--dataset", "cifar-100"),
    ("--model", "resnet"),
    ("--kernel", "4"),
    ("--minibatches-per-step", "0"),
    *(("--registered-model", value) for value in ("odd name/with:chars", "a:b", "..", " ")),
    *(("--objective", value) for value in ("val_auc", "val_acc,val_acc", "params")),
    ("--import", "{file}"),
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
    ("--workers", "100000", "--n-trials", "100000"),  # 90 TB of workers: refused on any machine
    ("--grace-period", "0"),
    *(("--study-name", value) for value in ("", "  ")),
    ("--sampler", "cma"),
    ("--pruner", "patient"),
    ("--registered-model", "a'b"),
    ("--registered-model", "odd name/with:chars"),
    *(("--until", value) for value in ("0", "-1")),
    *(("--storage", v) for v in ("nosuchdb://x", "sqlite:///{file}/optuna.db", "sqlite:///{readonly}")),
    ("--storage", "sqlite:///{missing}/optuna.db"),  # a folder that is not there is not made
    ("--storage", "postgresql://user:s3cret@127.0.0.1:9/optuna"),
    *(("--max-epochs", value) for value in ("two", "0")),
    ("--val-size", str(TINY_TRAIN + 100)),  # refused before a study has a trial to fail
    ("--tracking-uri", "foo://bar"),
    ("--data-dir", "{file}"),
    ("--experiment", ""),
]


# What some of those lines say, beyond the flag's name.
SAID = {
    ("train.py", "--tracking-uri", "foo://bar"): "the tracking URI's scheme 'foo' is unknown",
    ("train.py", "--width", "10000000000"): "10000000000 needs about 193.0 TB of memory to train",
    (
        "train.py",
        "--dataset",
        "cifar-100",
    ): "invalid choice: 'cifar-100' (choose from 'blocks', 'stripes'; one of your own: --import FILE",
    ("train.py", "--data-dir", "{file}"): "is a file, not a folder",
    ("train.py", "--import", "{file}"): "SyntaxError",
    ("tune.py", "--workers", "100000"): "100000 workers need about",
    ("tune.py", "--storage", "postgresql://user:s3cret@127.0.0.1:9/optuna"): "postgresql://user:***@127.0.0.1:9/optuna",
    ("tune.py", "--study-name", ""): "the value is empty",
    **{
        (script, "--val-size", str(TINY_TRAIN + 100)): f"{TINY_TRAIN + 100} of {TINY_TRAIN} images to validate on "
        "leaves none to train"
        for script in ("train.py", "tune.py")
    },
    ("tune.py", "--storage", "sqlite:///{missing}/optuna.db"): "does not exist: create it, or name another",
}


@pytest.mark.parametrize(
    ("script", "flag", "value", "more"),
    [("train.py", flag, value, more) for flag, value, *more in BAD_TRAIN]
    + [("tune.py", flag, value, more) for flag, value, *more in BAD_TUNE],
)
def test_a_bad_value_is_one_line_that_names_its_flag_and_creates_nothing(
    call_script, tiny_data, tmp_path, read_only_database, script, flag, value, more
):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder, nor Python")
    before = read_only_database.read_bytes()
    missing = tmp_path / "not" / "there"
    value_given = value.format(file=a_file, readonly=read_only_database, missing=missing)
    result = call_script(script, "--data-dir", str(tiny_data), "--val-size", str(TINY_VAL), flag, value_given, *more)

    assert_flag_error(result, script, flag)
    assert "Traceback" not in result.stderr and "s3cret" not in result.stdout + result.stderr
    assert SAID.get((script, flag, value), "") in result.stderr
    assert not [name for name in STORES if (tmp_path / name).exists()] and not missing.parent.exists()
    assert read_only_database.read_bytes() == before


@pytest.mark.parametrize("uri", ["./mlruns", "file:./mlruns"])
def test_a_tracking_uri_from_the_environment_is_named_as_such_in_one_short_line(
    call_script, tiny_data, tmp_path, monkeypatch, uri
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = call_script("train.py", "--data-dir", str(tiny_data), "--val-size", str(TINY_VAL))
    [line] = result.stderr.strip().splitlines()
    assert result.returncode == 2 and line.startswith("train.py: error: environment variable MLFLOW_TRACKING_URI: ")
    assert "folder stores" in line and "sqlite:///mlflow.db" in line and len(line) < 250
    assert not [name for name in STORES if (tmp_path / name).exists()]


@pytest.mark.parametrize("script", ["train.py", "tune.py"])
def test_corrupt_data_is_reported_before_any_store_or_run_exists(call_script, tiny_data, tmp_path, script):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir)
    victim = data_dir / "blocks" / "t10k-labels-idx1-ubyte"
    victim.write_bytes(victim.read_bytes()[:-3])
    from tunetrack.machinery.data import files

    files._verified.clear()
    result = call_script(script, "--data-dir", str(data_dir), "--val-size", str(TINY_VAL))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"{script}: error: ") and "t10k-labels-idx1-ubyte is present but its MD5" in line
    assert not [name for name in STORES if (tmp_path / name).exists()]


def a_study_in(folder, data_dir) -> None:
    """What `tune.py --n-trials 1 --max-epochs 2` in ``folder`` leaves there, made in this process."""
    settings = TinySettings(max_epochs=2, data_dir=str(data_dir))
    options = TuneOptions(n_trials=1, workers=1, accelerator="cpu", storage=f"sqlite:///{folder / 'optuna.db'}",
                          repeats=0, baseline="none")  # fmt: skip
    tracker = connect(f"sqlite:///{folder / 'mlflow.db'}", "blocks-tune")
    tune(TINY, settings, options.resolved(settings), lambda: tracker)


@pytest.mark.slow  # a script in a process of its own
def test_a_continuation_with_other_settings_is_refused_and_changes_nothing(
    run_script, call_script, tiny_data, tmp_path
):
    # Never more workers than trials: one, here, and no warning.
    first = run_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--workers", "3", "--max-epochs", "2"))
    assert first.returncode == 0 and "warning" not in first.stderr, first.stderr
    [trial] = read_trials(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert trial.user_attrs["worker"]["pid"] != os.getpid()
    stores = {name: (tmp_path / name).read_bytes() for name in ("optuna.db", "mlflow.db")}

    for changed, flag, said in (
        (["--max-epochs", "3"], "--max-epochs", "trains every trial with max_epochs=2, not 3"),
        (["--model", "conv", "--study-name", "blocks-dense"], "--model", "with model=dense, not conv"),
        (["--dataset", "stripes", "--study-name", "blocks-dense"], "--dataset", "with dataset=blocks, not stripes"),
        (["--sampler", "random"], "--sampler", "searches with the sampler tpe, not random"),
        (["--pruner", "hyperband"], "--pruner", "searches with the pruner median, not hyperband"),
        (["--no-pruning"], "--no-pruning", "searches with the pruner median, not none"),
    ):
        args = tune_args(tiny_data, "--n-trials", "1", "--workers", "1", "--max-epochs", "2", *changed)
        other = call_script("tune.py", *args)  # the last --max-epochs counts
        assert_flag_error(other, "tune.py", flag)
        assert said in other.stderr and "--study-name" in other.stderr
    assert {name: (tmp_path / name).read_bytes() for name in stores} == stores
    # The parent run records the settings that define the study.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    wanted = "tags.`optuna.study` = 'blocks-dense' AND tags.`mlflow.runName` = 'blocks-dense'"
    [parent] = client.search_runs(["1"], wanted)
    assert parent.data.params["max_epochs"] == "2" and parent.data.params["val_size"] == str(TINY_VAL)


def test_an_error_of_a_trials_own_code_is_said_as_it_is_and_ends_the_study(
    call_script, tiny_data, tmp_path, monkeypatch
):
    """A ValueError raised by a trial's own code (a network of one's own, here) fails that trial
    with its reason and ends the study in one line; it is not taken for Optuna's refusal to
    record a trial that another process had finished."""
    (tmp_path / "broken.py").write_text(
        "from tiny.experiment import NETWORKS, Dense\n\n\n"
        "class Broken(Dense):\n"
        "    def forward(self, x):\n"
        "        if x.is_meta:  # the memory check's pass, which measures and computes nothing\n"
        "            return super().forward(x)\n"
        "        raise ValueError('a shape this network cannot take')\n\n\n"
        "NETWORKS['broken'] = Broken\n"
    )
    monkeypatch.setitem(tiny.NETWORKS, "broken", None)  # what --import registers is taken out after the test
    args = ["--import", "broken.py", "--model", "broken", "--n-trials", "3", "--workers", "1", "--max-epochs", "1"]
    result = call_script("tune.py", *tune_args(tiny_data, *args))
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "tune.py: error: ValueError: a shape this network cannot take"
    assert "Traceback" not in result.stderr
    assert "trial   0 FAIL" in result.stdout and "given up by another process" not in result.stdout
    [trial] = read_trials(f"sqlite:///{tmp_path / 'optuna.db'}")  # the first trial ended the study
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "a shape this network cannot take"
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    [run] = [r for r in runs if "optuna.trial" in r.data.tags]
    [parent] = [r for r in runs if "optuna.trial" not in r.data.tags]
    assert run.info.status == "FAILED"
    assert parent.info.status == "FAILED" and "a shape this network cannot take" in parent.data.tags["error"]


NETWORK_OF_ONES_OWN = """from tiny.experiment import NETWORKS, Dense


class Unbuilt(Dense):
    def __init__(self, input_shape, num_classes, width):
        super().__init__(input_shape, num_classes, width)
        raise RuntimeError("a layer I have not written yet")


class Misshapen(Dense):
    def forward(self, x):
        return super().forward(x[:, :, :3])


NETWORKS["unbuilt"], NETWORKS["misshapen"] = Unbuilt, Misshapen
"""


@pytest.mark.parametrize(
    ("model", "said"),
    [
        ("unbuilt", "mine.py:7: RuntimeError: a layer I have not written yet"),
        # Found before anything trains: the example batch that goes through it on PyTorch's meta device.
        ("misshapen", "the network Misshapen (mine.py:10) cannot take inputs of 1x16x16 at its layer 1 "
                      "(Linear(in_features=256, out_features=16, bias=True)) (raised at mine.py:12): RuntimeError: "
                      "a and b must"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("script", ["train.py", "tune.py"])
def test_a_network_of_ones_own_that_raises_is_one_line_naming_its_file(
    call_script, tiny_data, tmp_path, monkeypatch, script, model, said
):
    (tmp_path / "mine.py").write_text(NETWORK_OF_ONES_OWN)
    # What --import registers, and the module it imports once a process, are taken out after the test.
    monkeypatch.setitem(tiny.NETWORKS, "unbuilt", None)
    monkeypatch.setitem(tiny.NETWORKS, "misshapen", None)
    monkeypatch.delitem(sys.modules, "imported_mine", raising=False)
    result = call_script(script, "--import", "mine.py", "--model", model, "--data-dir", str(tiny_data))
    [error] = result.stderr.strip().splitlines()
    assert result.returncode == 1 and error.startswith(f"{script}: error: {said}"), result.stderr
    assert not [name for name in STORES if (tmp_path / name).exists()]
    shown = call_script(script, "--import", "mine.py", "--model", model, "--data-dir", str(tiny_data), "--verbose")
    assert "Traceback" in shown.stderr and shown.stderr.strip().splitlines()[-1] == error


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [["train.py", "--help"], ["tune.py", "--help"], ["train.py", "--model", "nope"],
     ["tune.py", "--dataset", "nope"], ["tune.py", "--lr", "0"]],
)  # fmt: skip
def test_help_and_a_refused_flag_answer_before_torch_is_imported(command):
    """--help lists the data sets and networks, and a wrong one is refused, from the registries'
    source: no torch, Lightning, MLflow or Optuna, each seconds to import (docs/performance.md)."""
    script, *args = command
    python = [sys.executable, "-X", "importtime", str(ROOT / "scripts" / script)]
    result = subprocess.run([*python, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    said = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    imported = imported_modules(result.stderr)
    assert "tunetrack.machinery.cli.flags" in imported  # the list is whole
    assert not {name.split(".")[0] for name in imported} & {"torch", "pytorch_lightning", "mlflow", "optuna"}
    if args == ["--help"]:
        assert result.returncode == 0 and not said, result.stderr
        assert "--dataset {mnist,fashion-mnist,kmnist,folder}" in result.stdout and "--model {mlp,cnn}" in result.stdout
    else:
        assert result.returncode == 2 and len(said) == 1 and said[0].startswith(f"{script}: error: argument {args[0]}")


@pytest.mark.parametrize(
    ("source", "keys"),
    [
        ('REGISTRY = {"a": int, "b": str}\n', ["a", "b"]),
        ('REGISTRY: dict = {"a": int}\nOTHER = {"c": 1}\n', ["a"]),
        ('REGISTRY = {"a": int}\nREGISTRY["b"] = str\n', None),  # what it holds is not all written in one place
        ('REGISTRY = {"a": int}\nREGISTRY.update(b=str)\n', None),
        ('REGISTRY = {"a": int}\nREGISTRY = {}\n', None),
        ("REGISTRY = dict(a=int)\n", None),
        ('KEY = "a"\nREGISTRY = {KEY: int}\n', None),
        ('def f():\n    global REGISTRY\n    REGISTRY = {}\nREGISTRY = {"a": int}\n', None),
    ],
)
def test_a_registrys_names_are_read_from_its_source_only_where_it_says_them_all(tmp_path, monkeypatch, source, keys):
    (tmp_path / "registry_source.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert flags.literal_keys("registry_source", "REGISTRY") == keys
    assert "registry_source" not in sys.modules  # read, not imported


def test_help_lists_what_a_file_of_ones_own_registers(call_script, tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text(NETWORK_OF_ONES_OWN)
    monkeypatch.setitem(tiny.NETWORKS, "unbuilt", None)
    monkeypatch.setitem(tiny.NETWORKS, "misshapen", None)
    monkeypatch.delitem(sys.modules, "imported_mine", raising=False)
    shown = call_script("train.py", "--import", "mine.py", "--help")
    assert shown.returncode == 0 and "--model {dense,conv,unbuilt,misshapen}" in shown.stdout, shown.stderr


def test_a_searched_setting_named_on_the_command_line_is_fixed_and_the_rest_searched(call_script, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = call_script("tune.py", *tune_args(tiny_data, "--batch-size", "64", "--n-trials", "3", "--workers", "1"))
    assert result.returncode == 0, result.stderr
    assert "searching lr, width; fixed by the command line: batch_size=64" in result.stdout
    study = optuna.load_study(study_name="blocks-dense", storage=storage)
    assert [t.params["batch_size"] for t in study.trials] == [64] * 3
    assert len({(t.params["lr"], t.params["width"]) for t in study.trials}) == 3  # the others searched
    assert study.user_attrs["definition"]["search"]["fixed"] == {"batch_size": 64}

    again = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "1"))  # the study fixes it: so must this
    assert_flag_error(again, "tune.py", "--study-name")
    assert "fixes batch_size=64 and searches the rest, not nothing" in again.stderr
    outside = call_script("tune.py", *tune_args(tiny_data, "--batch-size", "7", "--study-name", "other"))
    assert_flag_error(outside, "tune.py", "--batch-size")
    assert "7 is outside the space a study searches" in outside.stderr and len(study.trials) == 3


def test_the_memory_a_study_needs_is_reckoned_at_the_settings_the_command_line_fixed(tiny_settings):
    from tunetrack.machinery.runtime import memory

    settings = dataclasses.replace(tiny_settings, width=4)  # tune.py --width 4
    searched = memory.most_demanding(TINY, settings)
    fixed = memory.most_demanding(TINY, settings, fixed=("width",))
    assert searched.width == 32 and (fixed.width, fixed.lr) == (4, searched.lr)  # the rest at their most
    assert memory.bytes_to_train(TINY, fixed) < memory.bytes_to_train(TINY, searched)


def test_a_split_that_leaves_almost_nothing_to_train_on_is_refused(call_script, tiny_data, tmp_path):
    for script in ("train.py", "tune.py"):
        result = call_script(script, "--data-dir", str(tiny_data), "--val-size", "460")
        assert_flag_error(result, script, "--val-size")
        assert "460 of 500 images to validate on leaves 40 to train: fewer than a tenth; hold out at most 450" in (
            result.stderr
        )
        assert not [name for name in STORES if (tmp_path / name).exists()]


def test_a_deleted_mlflow_experiment_that_a_study_continues_in_is_restored_and_said(call_script, tiny_data, tmp_path):
    first = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--workers", "1"))
    assert first.returncode == 0, first.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.delete_experiment(client.get_experiment_by_name("blocks-tune").experiment_id)
    again = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--workers", "1"))
    assert again.returncode == 0, again.stderr
    assert "the MLflow experiment 'blocks-tune' was deleted: it is restored, with its runs" in again.stdout
    assert client.get_experiment_by_name("blocks-tune").lifecycle_stage == "active"


@pytest.mark.slow  # a script in a process of its own
def test_a_tracking_store_that_lost_its_runs_is_said_and_the_study_goes_on(run_script, tiny_data, tmp_path):
    args = tune_args(tiny_data, "--n-trials", "1", "--workers", "1", "--max-epochs", "2")
    a_study_in(tmp_path, tiny_data)
    (tmp_path / "mlflow.db").unlink()
    shutil.rmtree(tmp_path / "mlruns")

    again = run_script("tune.py", *args)  # a process of its own: this one's MLflow holds the old file open
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert "has no run of study 'blocks-dense'" in again.stdout and "a new parent run starts there" in again.stdout
    assert "test evaluation skipped: the best trial, trial " in again.stdout  # unless the new trial is best
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 2  # a parent and the new trial


@pytest.mark.slow  # a script in a process of its own
def test_a_new_study_beside_an_older_one_of_the_same_name_is_told_apart(run_script, tiny_data, tmp_path):
    args = tune_args(tiny_data, "--n-trials", "1", "--workers", "1", "--max-epochs", "2")
    a_study_in(tmp_path, tiny_data)
    (tmp_path / "optuna.db").unlink()

    again = run_script("tune.py", *args)  # a process of its own: this one's MLflow holds the old file open
    assert again.returncode == 0, again.stderr
    uid = optuna.load_study(study_name="blocks-dense", storage=f"sqlite:///{tmp_path / 'optuna.db'}").user_attrs["uid"]
    note = "a new study 'blocks-dense' began beside 1 older one(s) of the same name in this MLflow experiment"
    assert again.stdout.count(note) == 2  # when it begins, and in the summary
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    new = [r for r in runs if r.data.tags.get("optuna.study_uid") == uid]
    assert sorted(r.data.tags["mlflow.runName"] for r in new) == [f"blocks-dense ({uid[:8]})", "trial 0"]
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}


def test_a_ctrl_c_that_a_garbage_collector_callback_swallows_still_stops_training(capfd):
    """Seen once in 2-worker Ctrl-C runs: the handler's KeyboardInterrupt landed in a weakref
    callback, which Python prints as "Exception ignored" and drops."""

    class Thing:
        pass

    def callback(_):
        interrupts.handler(signal.SIGINT, None)  # the Ctrl-C arrives just as this runs

    original = signal.getsignal(signal.SIGINT)
    try:
        with interrupts.handling(), pytest.raises(KeyboardInterrupt), interrupts.interruptible():
            thing = Thing()
            ref = weakref.ref(thing, callback)
            del thing  # the callback runs here; its KeyboardInterrupt goes nowhere
            assert ref() is None and interrupts.requested()
            interrupts.check()  # what training calls at every step
            raise AssertionError("training went on")
    finally:
        signal.signal(signal.SIGINT, original)
    assert "Exception ignored" not in capfd.readouterr().err


@pytest.mark.slow
def test_timeout_counts_from_the_start_and_every_worker_trains_once(run_script, tiny_data, tmp_path):
    """Both workers' first trials are held at their second epoch until the timeout has passed:
    each trains its one trial to the end, and no machine is fast enough to start a third."""
    held, release = tmp_path / "held", tmp_path / "release"
    held.mkdir()
    env = {"TINY_HOLD_AT_EPOCH": "1", "TINY_HOLD_FILE": str(held), "TINY_HOLD_EVERY": "1",
           "TINY_RELEASE_FILE": str(release)}  # fmt: skip
    args = tune_args(tiny_data, "--n-trials", "6", "--workers", "2", "--timeout", "1")
    process = run_script("tune.py", *args, background=True, env=env)
    wait_for(lambda: len(list(held.iterdir())) == 2, what="both workers' trials, held", process=process)
    time.sleep(1.1)  # the session's deadline, set before its first trial, has passed
    release.touch()
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    trials = optuna.load_study(study_name="blocks-dense", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert sorted(t.number for t in trials) == [0, 1] and {t.state for t in trials} == {TrialState.COMPLETE}
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both workers, one trial each
    assert stdout.count(" COMPLETE ") == 2
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.data.tags["optuna.trial"] for r in runs if r is not parent) == ["0", "1"]
    assert {r.info.status for r in runs} == {"FINISHED"}


NASTY_NAME = "a'b\"c"  # both quotes: no MLflow filter string can hold it
EPOCHS_UNDER_FIRE = 30  # a trial of the tiny data set lasts long enough to be killed mid-way


def runners(storage: str) -> set[int]:
    """The processes that run a trial of the only study in ``storage`` now."""
    return {t.user_attrs["worker"]["pid"] for t in read_trials(storage) if t.state == TrialState.RUNNING
            and "worker" in t.user_attrs}  # fmt: skip


def completed(storage: str) -> int:
    return sum(t.state == TrialState.COMPLETE for t in read_trials(storage))


def freeze_mid_trial(storage: str, process: subprocess.Popen, whole_group: bool, rng: random.Random) -> list[int]:
    """Freeze (SIGSTOP) at a random moment a worker in the middle of a trial, or the whole
    process group while one is; return the frozen pids. A moment that falls between trials is
    let go (SIGCONT) and another one drawn. A session whose trials all ended before a moment
    was caught (a busy machine polls slowly) freezes nothing: the empty list says so."""
    while True:
        wait_for(lambda: process.poll() is not None or running_trial_with_run(storage), what="a running trial")
        if process.poll() is not None:
            return []
        time.sleep(rng.uniform(0, 0.3))
        workers = worker_pids(process.pid)
        candidates = sorted(runners(storage) & set(workers or [process.pid]))
        if not candidates:
            continue
        victims = [process.pid, *workers] if whole_group else [rng.choice(candidates)]
        if send(victims, signal.SIGSTOP) and runners(storage) & set(victims):
            return victims
        send(victims, signal.SIGCONT)


def send(pids: list[int], signum: int) -> bool:
    """Send ``signum`` to each of ``pids``; whether each was still there to take it (a worker
    that ends with its session's last trial is gone at any moment, reaped by its server)."""
    there = True
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            there = False
    return there


@pytest.mark.slow
def test_random_kills_never_lose_a_trial_nor_leave_a_run_running(run_script, tiny_data, tmp_path):
    """Kill one worker, or the whole process group, with SIGKILL at seeded random moments in the
    middle of a trial of short sessions of a 2-worker study; run the same command again until
    as many trials completed as asked; then every record must agree, and every trial a kill
    left RUNNING must have been found and said so."""
    wanted, plan, rng = 3, ["worker", "group", "worker"], random.Random(20261128)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    base = tune_args(tiny_data, "--study-name", NASTY_NAME, "--workers", "2", "--no-pruning")
    base += ["--max-epochs", str(EPOCHS_UNDER_FIRE)]
    base += ["--grace-period", "2"]  # a trial killed before its worker named itself is failed soon after
    kills, outputs, killed = [], [], False
    # Killed sessions leave what they could not close to the next session: always run one more.
    # A session that ended before its kill landed is simply followed by another that tries again.
    while (done := completed(storage)) < wanted or killed or len(kills) < len(plan):
        # Two trials a session, one a worker: a killed session cannot finish the study.
        trials = 2 if len(kills) < len(plan) else max(1, min(2, wanted - done))
        process = run_script("tune.py", *base, "--n-trials", str(trials), background=True)
        killed = False
        if len(kills) < len(plan):
            whole_group = plan[len(kills)] == "group"
            if victims := freeze_mid_trial(storage, process, whole_group, rng):
                if whole_group:
                    os.killpg(process.pid, signal.SIGKILL)  # the machine, as it were
                else:
                    os.kill(victims[0], signal.SIGKILL)  # tune.py and the other worker go on
                kills.append(plan[len(kills)])
                killed = True
        stdout, stderr = process.communicate(timeout=300)
        outputs.append(stdout)
        assert "Traceback" not in stderr, stderr
        assert killed or process.returncode == 0, stderr
        assert len(outputs) < 12, f"{len(kills)} of the {len(plan)} kills landed in {len(outputs)} sessions"

    study = optuna.load_study(study_name=NASTY_NAME, storage=storage)
    trials = study.trials
    assert len({t.number for t in trials}) == len(trials)
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= wanted
    # A trial a kill cut short goes on in a later session, or waits for the next one.
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING) for t in trials)
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
        # One run a trial; a second only where it was cut short before it kept an epoch, and
        # then the new one names the one it continues.
        its_runs, current = by_trial.get(trial.number, []), trial.user_attrs.get("mlflow_run_id")
        continued = {run.data.tags.get("continues") for run in its_runs}
        assert all(run.info.run_id in continued for run in its_runs if run.info.run_id != current)
        if trial.state == TrialState.COMPLETE:
            [run] = [run for run in its_runs if run.info.status != "KILLED"]
            assert run.info.status == "FINISHED" and run.info.run_id == current
            history = client.get_metric_history(run.info.run_id, "val_loss")
            assert [m.step for m in history] == list(range(EPOCHS_UNDER_FIRE))  # every epoch, once
        else:
            assert all(run.info.status in ("KILLED", "FAILED") for run in by_trial.get(trial.number, []))
    cut = [t for t in trials if t.user_attrs.get("cut_short", {}).get("why") == "its worker process died"]
    assert sum(t.user_attrs["cut_short"]["times"] for t in cut) >= len(plan)  # every kill landed mid-trial
    said = "\n".join(outputs)
    for trial in cut:
        assert re.search(rf"trial +{trial.number}\b.*cut short \(its worker process died\): it resumes", said)
