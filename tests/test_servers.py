"""One study spread over "machines" through real servers: a PostgreSQL cluster for Optuna and
`mlflow server` (on PostgreSQL, serving its artifacts) for MLflow, both started here. Each
machine is a tune.py in a working directory and data folder of its own, with a host name of its
own (a UTS namespace), sharing no file with the others."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import TINY_TEST, read_trials, wait_for
from tiny import experiment as tiny
from workbench.servers import (
    can_make_namespaces,
    mlflow_server,
    network_namespace,
    postgres,
    postgres_bin,
    scratch_folder,
)

pytestmark = [
    pytest.mark.servers,
    pytest.mark.slow,
    pytest.mark.skipif(
        postgres_bin() is None, reason="PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it"
    ),
]


@contextlib.contextmanager
def servers_in_a_scratch_folder(also: str | None = None):
    """A new PostgreSQL cluster, and an mlflow server on it, for the block; with ``also``, both
    listen on that address too."""
    folder = scratch_folder("tunetrack-servers-")
    host = "0.0.0.0" if also else "127.0.0.1"
    try:
        with (
            postgres(folder / "postgres", also=(also,) if also else ()) as database,
            mlflow_server(database.url("mlflow"), folder / "mlflow", host=host) as ml,
        ):
            yield database, ml
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_servers():
    """Servers for the tests that leave them running: each keeps to a study and an experiment
    of its own."""
    with servers_in_a_scratch_folder() as servers:
        yield servers


@pytest.fixture
def own_servers():
    """Servers for a test that stops or restarts them."""
    with servers_in_a_scratch_folder() as servers:
        yield servers


@pytest.fixture
def machines(run_script, tiny_data, tmp_path, request):
    """``start(servers, name, *args)``: tune.py on a "machine" ``name`` of its own against
    ``servers``, in a study and an MLflow experiment named after the test; returns the Popen."""
    study = request.node.name[:40]

    def start(servers, name: str, *args: str, namespace=None, env: dict | None = None):
        database, tracking = servers
        home = tmp_path / name
        if not home.exists():
            shutil.copytree(tiny_data, home / "data")
        host = namespace.gateway if namespace else "127.0.0.1"  # where the machine reaches the servers
        common = ["--storage", database.url("optuna", host=host), "--data-dir", "data"]
        common += ["--tracking-uri", tracking.url.replace("127.0.0.1", host)]
        common += ["--study-name", study, "--experiment", study, "--accelerator", "cpu"]
        common += ["--repeats", "0", "--baseline", "none"]  # the servers are what is tested
        return run_script("tune.py", *common, *args, background=True, cwd=home, hostname=name, namespace=namespace,
                          env=env)  # fmt: skip

    start.study = study
    return start


def trials_of(database, name: str) -> list:
    return read_trials(database.url("optuna"), name)


def finish(process, timeout: float = 300) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def runs_of(tracking, experiment: str) -> list:
    client = MlflowClient(tracking.url)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def assert_every_run_closed_with_curves(tracking, experiment: str, trials, epochs: int) -> list:
    client = MlflowClient(tracking.url)
    runs = runs_of(tracking, experiment)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    for trial in trials:
        [run] = [r for r in runs if r.data.tags.get("optuna.trial") == str(trial.number)]
        if trial.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED"
            assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == list(range(epochs))
        else:
            assert run.info.status in ("KILLED", "FAILED")
    return runs


def test_two_machines_started_together_share_one_study(machines, shared_servers, tmp_path):
    database, tracking = shared_servers
    started = [
        machines(shared_servers, name, "--n-trials", "3", "--workers", "2", "--max-epochs", "2") for name in "ab"
    ]
    for code, stdout, stderr in map(finish, started):
        assert code == 0 and "Traceback" not in stderr, stderr
        assert database.password not in stdout + stderr

    trials = trials_of(database, machines.study)
    assert sorted(t.number for t in trials) == list(range(6)) and {t.state for t in trials} == {TrialState.COMPLETE}
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # no twins
    assert {t.user_attrs["worker"]["host"] for t in trials} == {"a", "b"}
    runs = assert_every_run_closed_with_curves(tracking, machines.study, trials, epochs=2)
    assert len(runs) == 7
    for name in "ab":  # nothing of either store on either machine
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["data"]

    # From a third folder, through the server alone: every checkpoint, and the best model.
    elsewhere = tmp_path / "third"
    elsewhere.mkdir()
    client = MlflowClient(tracking.url)
    for trial in trials:
        path = client.download_artifacts(trial.user_attrs["mlflow_run_id"], "checkpoints/best.ckpt", str(elsewhere))
        assert os.path.getsize(path) > 10_000
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    mlflow.set_tracking_uri(tracking.url)
    images, labels = tiny.pictures(TINY_TEST, seed=1, pattern=tiny.PATTERNS["blocks"])
    # Each machine tested the best trial it saw as it ended: one model each, with its own score.
    outputs = parent.outputs.model_outputs
    assert len(outputs) == 2
    for output in outputs:
        logged = client.get_logged_model(output.model_id)
        [test_acc] = [metric.value for metric in logged.metrics if metric.key == "test_acc"]
        assert int(logged.tags["tested_trial"]) in {t.number for t in trials}
        (elsewhere / output.model_id).mkdir()
        model = mlflow.pytorch.load_model(f"models:/{output.model_id}", dst_path=str(elsewhere / output.model_id))
        with torch.no_grad():
            predicted = model(torch.from_numpy(images).float().unsqueeze(1) / 255).argmax(dim=1).numpy()
        assert float(np.mean(predicted == labels)) == pytest.approx(test_acc, abs=1e-6)


@pytest.fixture
def cut_off():
    """A network namespace for a "machine" that can be cut off for real, and servers that it
    reaches over its link: (namespace, (database, tracking))."""
    if not can_make_namespaces():
        pytest.skip("cutting a machine off needs root and iproute2's ip (apt-get install iproute2)")
    with network_namespace() as namespace, servers_in_a_scratch_folder(namespace.gateway) as servers:
        yield namespace, servers


def in_transaction_from(database, address: str) -> int:
    """Sessions of clients at ``address`` that the server holds open in a transaction."""
    import psycopg

    with psycopg.connect(database.url("postgres"), autocommit=True) as connection:
        query = "SELECT count(*) FROM pg_stat_activity WHERE client_addr = %s AND state LIKE 'idle in transaction%%'"
        return connection.execute(query, (address,)).fetchone()[0]


def test_a_machine_cut_off_and_back_leaves_what_the_other_one_took_up(machines, cut_off):
    """Machine a, on a network of its own, loses its link to the servers for longer than the
    grace period while machine b goes on, hands a's trial back to the study and takes it up
    from its last epoch; when the link is back, a leaves that trial and its run to b, and goes
    on. Every trial is accounted for once, and no record is overwritten."""
    namespace, servers = cut_off
    database, tracking = servers
    common = ["--workers", "1", "--max-epochs", "100", "--no-pruning", "--grace-period", "3"]
    a = machines(servers, "a", "--n-trials", "2", *common, namespace=namespace)
    b = machines(servers, "b", "--n-trials", "200", *common)

    def running_on(host: str):  # trials that kept an epoch, to be taken up from
        return [t for t in trials_of(database, machines.study) if t.state == TrialState.RUNNING
                and "kept_state" in t.user_attrs and t.user_attrs["worker"]["host"] == host]  # fmt: skip

    while True:
        [victim] = wait_for(lambda: running_on("b") and running_on("a"), what="both machines' trials", process=a)
        namespace.cut()
        # A link cut in the middle of a transaction leaves its rows locked on the server until
        # its session is given up (idle_in_transaction_session_timeout): cut between them.
        if not in_transaction_from(database, namespace.address):
            break
        namespace.mend()
        time.sleep(0.2)
    client = MlflowClient(tracking.url)
    run_id = victim.user_attrs["mlflow_run_id"]

    def taken_up_by_b():
        now = trials_of(database, machines.study)[victim.number]
        return "cut_short" in now.user_attrs and now.user_attrs["worker"]["host"] == "b" and now

    try:
        taken = wait_for(taken_up_by_b, what="b to take a's trial up", process=b)
        wait_for(lambda: client.get_run(run_id).data.tags.get("resumed"), what="its run reopened by b")
    finally:
        namespace.mend()
    assert taken.user_attrs["cut_short"]["why"] == "its heartbeat stopped for over 3 s"
    code, stdout, stderr = finish(a)
    assert code == 0 and "error" not in stderr, stderr
    # Whether b has finished the trial by now or not, a says it left it, and went on with its next.
    assert f"trial {victim.number:>3} LEFT " in stdout
    assert "given up by another process after 3 s without a heartbeat" in stdout
    assert stdout.count(" COMPLETE ") == 1, stdout

    os.killpg(b.pid, signal.SIGINT)
    code, stdout, stderr = finish(b)
    assert code == 130, stderr
    assert f"trial {victim.number:>3} WAITING" in stdout and "cut short (its heartbeat stopped for over 3 s)" in stdout
    trials = trials_of(database, machines.study)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.FAIL}  # b's Ctrl-C failed what it ran
    assert [t.user_attrs["worker"]["host"] for t in trials if t.state == TrialState.COMPLETE].count("a") == 1
    assert trials[victim.number].user_attrs["worker"]["host"] == "b"
    # Its run is the one b went on in: a's curve up to where b took it up, then b's. A write of a's
    # that was under way as the link went may land when it is back: the same point as b's.
    steps = sorted({m.step for m in client.get_metric_history(run_id, "val_loss")})
    assert steps == list(range(len(steps))) and len(steps) > taken.user_attrs["cut_short"]["epoch"]
    runs = runs_of(tracking, machines.study)
    # One parent run, though a reaches the servers through its gateway's address and b through
    # 127.0.0.1: one server, whatever it is called.
    assert not [r for r in runs if r.info.status == "RUNNING"] and len(runs) == 1 + len(trials)


def test_a_machine_that_ends_first_says_which_trials_still_run_elsewhere(machines, shared_servers):
    database, _ = shared_servers
    # Long enough (a few seconds on the tiny data) to be seen running and stopped mid-way.
    long_trials = ["--n-trials", "1", "--workers", "1", "--max-epochs", "150", "--no-pruning"]
    a = machines(shared_servers, "a", *long_trials)
    [trial] = wait_for(  # running, and its worker named: a trial is RUNNING a moment before that
        lambda: [
            t for t in trials_of(database, machines.study) if t.state == TrialState.RUNNING and "worker" in t.user_attrs
        ],
        what="a's trial",
        process=a,
    )
    os.killpg(a.pid, signal.SIGSTOP)  # machine a hangs, its trial RUNNING, for as long as b takes
    try:
        code, stdout, stderr = finish(machines(shared_servers, "b", *long_trials))
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    assert code == 0, stderr
    owner = trials_of(database, machines.study)[trial.number].user_attrs["worker"]
    assert f"trial {trial.number} still runs on a (pid {owner['pid']}): it ends there, or, if its heartbeat " in stdout
    assert "stops for 60 s, the next process to start a trial of this study hands it back" in stdout


def test_a_study_goes_on_through_a_restart_of_each_server(machines, own_servers, tmp_path):
    """Both servers restart under trials in flight: both workers' first trials wait at their
    second epoch, their runs open and their heartbeats beating, while PostgreSQL restarts (every
    connection cut) and then the mlflow server does; then they go on, and so does the study."""
    database, tracking = own_servers
    held, release = tmp_path / "held", tmp_path / "release"
    held.mkdir()
    env = {"TINY_HOLD_AT_EPOCH": "1", "TINY_HOLD_FILE": str(held), "TINY_HOLD_EVERY": "1",
           "TINY_RELEASE_FILE": str(release)}  # fmt: skip
    args = ["--n-trials", "6", "--workers", "2", "--max-epochs", "3", "--no-pruning"]
    study = machines(own_servers, "a", *args, env=env)
    wait_for(lambda: len(list(held.iterdir())) == 2, what="both workers' trials in flight", process=study)
    database.restart()  # every connection cut; the workers reconnect
    tracking.restart()  # down for about ten seconds
    release.touch()
    code, stdout, stderr = finish(study)
    assert code == 0 and "Traceback" not in stderr, stderr
    trials = trials_of(database, machines.study)
    assert len(trials) == 6 and {t.state for t in trials} == {TrialState.COMPLETE}
    assert_every_run_closed_with_curves(tracking, machines.study, trials, epochs=3)
    assert "test (the best trial's weights, evaluated once)" in stdout


def test_a_database_that_stays_down_stops_the_study_in_one_line(machines, own_servers):
    database, tracking = own_servers
    # A trial created just as the server stopped may never have had its worker named: the next
    # session fails such a trial once it is older than the grace period, not at once.
    args = ["--workers", "1", "--max-epochs", "50", "--server-patience", "5", "--grace-period", "2"]
    study = machines(own_servers, "a", "--n-trials", "6", *args)
    wait_for(
        lambda: [t for t in trials_of(database, machines.study) if t.state == TrialState.RUNNING],
        what="a trial",
        process=study,
    )
    database.stop()  # the tracking server's own database too: it stops answering as well
    code, stdout, stderr = finish(study)
    assert code == 1
    [line] = stderr.strip().splitlines()[-1:]
    public = database.url("optuna").replace(database.password, "***")
    assert line.startswith(f"tune.py: error: the Optuna storage {public} did not answer for 5 s: "), line
    assert "Traceback" not in stderr and database.password not in stdout + stderr

    # What it could not close, the next session on that machine closes, once the server is back.
    database.start()
    code, _, stderr = finish(machines(own_servers, "a", "--n-trials", "1", *args))
    assert code == 0, stderr
    assert {t.state for t in trials_of(database, machines.study)} <= {TrialState.COMPLETE, TrialState.FAIL}
    assert not [r for r in runs_of(tracking, machines.study) if r.info.status == "RUNNING"]
