"""Several tune.py sharing one study on one machine (SQLite): started at the same instant in an
empty folder, they end with one study, one parent run, and no twin trials."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import tune_args


def start_together(run_script, commands: list[list[str]]) -> list[tuple[int, str, str]]:
    """Start every command at once; wait for all; return (exit code, stdout, stderr) each."""
    processes = [run_script("tune.py", *command, background=True) for command in commands]
    ended = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        ended.append((process.returncode, stdout, stderr))
    return ended


@pytest.mark.slow
def test_three_starts_at_once_in_an_empty_folder_make_one_study_and_one_parent_run(run_script, tiny_data, tmp_path):
    data_dir = tiny_data
    command = tune_args(data_dir, "--n-trials", "1", "--workers", "1", "--max-epochs", "1")
    for code, _, stderr in start_together(run_script, [command] * 3):
        assert code == 0 and "Traceback" not in stderr and "error" not in stderr, stderr

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert optuna.study.get_all_study_names(storage) == ["blocks-dense"]
    trials = optuna.load_study(study_name="blocks-dense", storage=storage).trials
    assert sorted(t.number for t in trials) == [0, 1, 2] and {t.state.name for t in trials} == {"COMPLETE"}
    # Three processes at the same point of the same study: seeded alike, they proposed twins.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in runs if r not in parents} == {parents[0].info.run_id}


def test_a_process_that_finds_the_study_just_created_waits_for_its_parent_run_past_enqueued_trials(tmp_path):
    """The creator enqueues the study's first points before it records its parent run: a second
    process that took those waiting trials for a study long under way made a second parent run."""
    import threading

    from tunetrack.machinery.study import parent_run

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.enqueue_trial({"lr": 1e-3})
    creator = threading.Timer(0.5, parent_run.record_run, (study, "store", "creators-run", None))
    creator.start()
    try:
        assert parent_run.recorded_runs(study, wait=True) == {"store": "creators-run"}
    finally:
        creator.join()


def test_a_parent_run_recorded_meanwhile_is_used_and_one_that_is_gone_is_replaced(tmp_path):
    from tunetrack.machinery.study import parent_run

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert parent_run.record_run(study, "store", "a", replacing=None) == "a"
    # Another process saw no run and made "b" while "a" was recorded: it uses "a".
    assert parent_run.record_run(study, "store", "b", replacing=None) == "a"
    # The store lost "a": the run made in its place is recorded.
    assert parent_run.record_run(study, "store", "c", replacing="a", settle=0.1) == "c"
    assert parent_run.recorded_runs(study) == {"store": "c"}


# Every private name of Optuna's the machinery uses, where, and why: the next Optuna may move
# any of them, and this test says which, before a study fails on it.
OPTUNAS_PRIVATES = {
    "optuna.storages._rdb.models:TrialModel.find_or_raise_by_id": "storage._end_attempt, to compare-and-set a "
    "trial's state, which no public call does",
    "optuna.storages._rdb.storage:_create_scoped_session": "storage._end_attempt's transaction",
    "optuna.storages:RDBStorage._get_stale_trial_ids": "storage._stale_trial_ids, and studies.take_back_dead_trials",
    "optuna.storages._cached_storage:_CachedStorage": "the wrapper whose backend calls PatientStorage retries",
    **{
        f"optuna.storages:RDBStorage.{name}": "what Optuna's _CachedStorage calls on its backend, retried"
        for name in ("_create_new_trial", "_set_trial_param", "_get_trials", "_get_best_trial_id")
    },
}


@pytest.mark.parametrize("private", sorted(OPTUNAS_PRIVATES))
def test_every_private_name_of_optunas_that_the_study_uses_is_there(private):
    import importlib

    import optuna

    module, _, path = private.partition(":")
    found = importlib.import_module(module)
    for part in path.split("."):
        found = getattr(found, part, None)
    assert found is not None, (
        f"Optuna {optuna.__version__} has no {module}.{path}, which {OPTUNAS_PRIVATES[private]} uses "
        "(machinery/study/storage.py): keep the Optuna of constraints.txt, or rewrite that use"
    )


def test_every_storage_call_optuna_makes_is_retried_while_a_server_blinks():
    """PatientStorage retries each call of Optuna's storage API it names, and the private ones
    that Optuna's _CachedStorage, which every study opened on it goes through, calls on its
    backend. A call left unwrapped fails its trial on a database restart (seen: _set_trial_param),
    so an Optuna that adds one must find it named here."""
    import inspect
    import re

    from optuna.storages import BaseStorage, _cached_storage

    from tunetrack.machinery.study.storage import PatientStorage

    called = set(re.findall(r"self\._backend\.(\w+)\(", inspect.getsource(_cached_storage)))
    called -= {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}  # settings, no query
    assert "_set_trial_param" in called  # what the pattern finds
    called |= {name for name in dir(BaseStorage) if not name.startswith("_")}
    unwrapped = sorted(name for name in called if not hasattr(getattr(PatientStorage, name), "__wrapped__"))
    assert not unwrapped, f"PatientStorage does not retry {unwrapped}: name them in machinery/study/storage.py"


def test_the_trials_csv_holds_while_another_process_adds_a_trial(tmp_path):
    """A session's CSV of the trials reads them twice (Optuna's table, then each trial's metrics);
    another process of the study may add a trial in between, as three starts at once did."""
    from tunetrack.machinery.study import results, studies

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trial = study.ask()
    trial.set_user_attr(studies.METRICS_ATTR, {"val_loss": 0.5, "val_acc": 0.9})
    study.tell(trial, 0.5)
    table = study.trials_dataframe

    def and_then_another(*args, **kwargs):
        frame = table(*args, **kwargs)
        study.ask().set_user_attr(studies.METRICS_ATTR, {"val_loss": 0.4})  # another process's, meanwhile
        return frame

    study.trials_dataframe = and_then_another
    frame = results.trials_frame(study)
    assert frame["number"].tolist() == [0] and frame["val_loss"].tolist() == [0.5]
    assert frame["val_acc"].tolist() == [0.9]
