"""Stopped from outside, and cut off and back: Ctrl-C, a scheduler's SIGTERM, a closed
terminal's SIGHUP, tune.py killed outright, and a worker paused past the grace period while
another process gives its trial up. Signals and pauses are sent for real, to real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import read_trials, tune_args, wait_for, worker_pids
from tunetrack.machinery.study.studies import KEPT_ATTR as KEPT

pytestmark = pytest.mark.slow

STOPPED = "finished trials are kept, the others and their MLflow runs are closed"


def alive_in_group(group: int) -> list[str]:
    """The processes of a process group that still run (a zombie has ended: it waits for init)."""
    table = subprocess.run(["ps", "-ww", "-eo", "pgid=,stat=,pid=,args="], capture_output=True, text=True).stdout
    return [
        line for line in table.splitlines() if line.split()[0] == str(group) and not line.split()[1].startswith("Z")
    ]


def trials_with_runs(storage: str) -> list:
    return [t for t in read_trials(storage) if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]


RESUMED = "finished trials are kept, the others go on from their last epoch in the study's next run"


@pytest.mark.parametrize(
    ("signum", "whole_group", "workers", "reason"),
    [
        (signal.SIGINT, True, 2, "interrupted"),  # Ctrl-C: the terminal signals every process
        (signal.SIGTERM, False, 2, "terminated"),  # kill, or a scheduler that signals tune.py only
        (signal.SIGHUP, True, 1, "hung up"),  # the terminal closed
    ],
)
def test_a_stop_from_outside_closes_every_trial_and_run_and_says_so(
    run_script, tiny_data, tmp_path, signum, whole_group, workers, reason
):
    """A person's Ctrl-C fails the trials; a scheduler's SIGTERM and a closed terminal's SIGHUP
    hand them back to the study, to go on from their last epoch (tests/test_resumption.py)."""
    resumes = signum != signal.SIGINT
    args = tune_args(tiny_data, "--n-trials", "4", "--workers", str(workers), "--max-epochs", "400", "--no-pruning")
    process = run_script("tune.py", *args, background=True)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    wait_for(lambda: len(trials_with_runs(storage)) == workers, what="every worker's trial", process=process)
    stop = os.killpg if whole_group else os.kill
    stop(process.pid, signum)
    if signum == signal.SIGINT:
        time.sleep(0.3)
        stop(process.pid, signum)  # and a second, impatient Ctrl-C
    stdout, stderr = process.communicate(timeout=120)

    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum
    assert stderr.strip().splitlines()[-1] == f"tune.py: error: {reason} ({name}); {RESUMED if resumes else STOPPED}"
    for noise in ("Traceback", "Exception ignored", "Trial 0 failed", "leaked", "resource_tracker"):
        assert noise not in stderr
    trials = optuna.load_study(study_name="blocks-dense", storage=storage).trials
    if resumes:
        assert stdout.count(" WAITING ") == workers and stdout.count(f"cut short ({reason}): it resumes") == workers
        assert f"{workers} trials, 0 complete, 0 pruned, 0 failed, {workers} cut short, to resume" in stdout
        assert {t.state for t in trials} == {TrialState.WAITING}
        assert {t.user_attrs["cut_short"]["why"] for t in trials} == {reason}
    else:
        assert stdout.count(" FAIL ") == workers and stdout.count(f"  {reason}  ") == workers  # a line each
        assert f"study 'blocks-dense': {workers} trials, 0 complete, 0 pruned, {workers} failed" in stdout
        assert {t.state for t in trials} == {TrialState.FAIL}
        assert {t.user_attrs["fail_reason"] for t in trials} == {reason}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(["1"])
    assert len(runs) == workers + 1 and {r.info.status for r in runs} == {"KILLED"}  # the study's own run too
    assert {r.data.tags["error"] for r in runs} == {f"{reason} ({name})"}
    # Stopped where they were, well inside a scheduler's grace: no trial was waited for to its end.
    trial_runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert all(len(client.get_metric_history(r.info.run_id, "val_loss")) < 400 for r in trial_runs)
    wait_for(lambda: not alive_in_group(process.pid), timeout=60, what="no process of tune.py's left")


def test_workers_end_soon_after_their_tune_py_is_killed_outright(run_script, tiny_data, tmp_path):
    args = tune_args(tiny_data, "--n-trials", "4", "--workers", "2", "--max-epochs", "150", "--no-pruning")
    process = run_script("tune.py", *args, background=True)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    wait_for(lambda: len(trials_with_runs(storage)) == 2, what="both workers' trials", process=process)
    workers = worker_pids(process.pid)
    assert len(workers) == 2
    os.kill(process.pid, signal.SIGKILL)  # tune.py alone: no handler runs, nothing is forwarded
    process.communicate(timeout=60)
    wait_for(lambda: not alive_in_group(process.pid), timeout=60, what="the orphaned workers to end")
    # Each worker noticed, and handed its trial back and closed its run, saying what happened:
    # nobody sent it a signal.
    trials = read_trials(storage)
    said = f"its tune.py (pid {process.pid}) ended without a word: killed, or its machine stopped"
    assert {t.state for t in trials} == {TrialState.WAITING}
    assert {t.user_attrs["cut_short"]["why"] for t in trials} == {said}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.info.run_name: r.info.status for r in client.search_runs(["1"])}
    # What only tune.py could have closed, the study's own run, the next session closes
    # (test_random_kills_never_lose_a_trial_nor_leave_a_run_running, in test_faults.py).
    assert runs == {"trial 0": "KILLED", "trial 1": "KILLED", "blocks-dense": "RUNNING"}


def test_train_py_ends_its_run_and_exits_143_on_sigterm(run_script, tiny_data, tmp_path):
    args = ["--data-dir", str(tiny_data), "--max-epochs", "5000"]
    process = run_script("train.py", *args, background=True)

    def training() -> bool:
        # Read-only, as SQLite: an MLflow client (made at once, as its constructor opens the
        # store) would make the store's tables itself while train.py is making them.
        try:
            with contextlib.closing(sqlite3.connect(f"file:{tmp_path / 'mlflow.db'}?mode=ro", uri=True)) as db:
                return bool(db.execute("SELECT count(*) FROM metrics WHERE key = 'val_loss'").fetchone()[0])
        except sqlite3.OperationalError:  # no store, or no table yet
            return False

    wait_for(training, what="an epoch done", process=process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert stderr.strip().splitlines()[-1] == "train.py: error: terminated (SIGTERM); the MLflow run is marked KILLED"
    [run] = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    assert run.info.status == "KILLED" and run.data.tags["error"] == "terminated (SIGTERM)"


def lock_free(*databases) -> bool:
    """Whether a writer could start and commit on each SQLite file now: nobody holds a lock on
    it, a reader's included (a writer's commit waits for every reader to finish)."""
    for path in databases:
        with sqlite3.connect(path, timeout=0.3) as db:
            try:
                db.execute("BEGIN EXCLUSIVE")
                db.rollback()
            except sqlite3.OperationalError:
                return False
    return True


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # the reckoner's heartbeat
def test_a_worker_back_from_a_pause_leaves_the_trial_another_process_took_up(run_script, tiny_data, tmp_path):
    """A worker stopped for longer than the grace period (a VM paused, a laptop's lid closed)
    has its trial handed back by another process, which takes it up from its last epoch and
    finishes it; when the first worker goes on, it leaves that trial and run as they are, says
    so in one line, and its tune.py ends well."""
    common = ("--max-epochs", "100", "--grace-period", "3", "--no-pruning")
    first = run_script("tune.py", *tune_args(tiny_data, "--n-trials", "2", "--workers", "2", *common), background=True)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # Both trials have kept an epoch, so the one taken up goes on in its own run (a trial cut
    # before its first kept epoch starts again, in a new run).
    wait_for(lambda: len([t for t in trials_with_runs(storage) if KEPT in t.user_attrs]) == 2,
             what="both workers' trials to keep an epoch", process=first)  # fmt: skip
    worker = worker_pids(first.pid)[0]
    # On one machine, a process stopped inside a read or a write holds SQLite's lock until it
    # goes on: stop it between them, as a paused machine's processes would all be.
    while True:
        os.kill(worker, signal.SIGSTOP)
        if lock_free(tmp_path / "optuna.db", tmp_path / "mlflow.db"):
            break
        os.kill(worker, signal.SIGCONT)
        time.sleep(0.05)
    [paused] = [t for t in read_trials(storage) if t.user_attrs.get("worker", {}).get("pid") == worker]
    # Past the grace period, as the storage itself reckons a heartbeat's age.
    reckoner = optuna.storages.RDBStorage(storage, heartbeat_interval=1, grace_period=3)
    study_id = reckoner.get_study_id_from_name("blocks-dense")
    wait_for(lambda: paused._trial_id in reckoner._get_stale_trial_ids(study_id), what="its heartbeat to go stale")

    second = run_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--workers", "1", *common))
    assert second.returncode == 0, second.stderr
    assert f"trial {paused.number:>3} WAITING" in second.stdout
    assert "cut short (its heartbeat stopped for over 3 s): it resumes from epoch" in second.stdout
    assert f"trial {paused.number:>3} COMPLETE" in second.stdout  # its one trial: the one it took up
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = paused.user_attrs["mlflow_run_id"]
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["resumed"].startswith("from epoch")

    os.kill(worker, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert "error" not in stderr
    assert f"trial {paused.number:>3} LEFT " in stdout
    assert "given up by another process after 3 s without a heartbeat: this" in stdout
    # The trial and its run stay as the other process left them.
    back = client.get_run(run_id)
    assert back.info.status == "FINISHED" and back.data.tags == finished.data.tags
    assert back.data.metrics == finished.data.metrics
    trials = read_trials(storage)
    [after] = [t for t in trials if t.number == paused.number]
    assert after.state == TrialState.COMPLETE and after.user_attrs["worker"]["pid"] != worker
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE"]
    # Every epoch, whoever trained it. A worker paused between its last look at the trial and
    # its next write may add a point the other one logged too: the same point, as both
    # trained the same epochs the same way.
    points = {(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")}
    assert sorted(step for step, _ in points) == list(range(100))
    runs = client.search_runs(["1"])
    assert not [r for r in runs if r.info.status == "RUNNING"] and len(runs) == 1 + 2


def test_a_study_given_its_total_and_stopped_adds_the_rest_when_run_again(run_script, call_script, tiny_data, tmp_path):
    """tune.py --until 6, Ctrl-C once 3 trials have ended, and the same command again: the study
    holds 6 trials that ended with a result, and each run's first line said what it would add."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = tune_args(tiny_data, "--until", "6", "--workers", "1", "--max-epochs", "20", "--no-pruning")
    first = run_script("tune.py", *args, background=True)
    wait_for(lambda: sum(t.state == TrialState.COMPLETE for t in read_trials(storage)) >= 3, what="3 trials",
             process=first)  # fmt: skip
    os.killpg(first.pid, signal.SIGINT)
    stdout, _ = first.communicate(timeout=120)
    assert first.returncode == 130 and "new study in " in stdout
    assert "adding 6 trials, to a total of 6 (--until)" in stdout
    before = read_trials(storage)
    done = sum(t.state == TrialState.COMPLETE for t in before)  # the one Ctrl-C stopped failed: it does not count
    again = call_script("tune.py", *args)
    assert again.returncode == 0, again.stderr
    assert (f": {len(before)} trials so far, {done} of them complete, pruned or under way; adding {6 - done}, to a "
            "total of 6 (--until)") in again.stdout  # fmt: skip
    trials = read_trials(storage)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6 and len(trials) == 7
    assert [t.state for t in trials].count(TrialState.FAIL) == 1
