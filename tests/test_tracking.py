"""The MLflow side: runs that always end, and calls that wait out a locked SQLite store."""

from __future__ import annotations

import mlflow
import pytest

from tunetrack.machinery.contract import DataSplit
from tunetrack.machinery.tracking import mlflow_runs
from tunetrack.machinery.tracking.mlflow_runs import RetryingClient, connect, http_patience
from tunetrack.machinery.tracking.stores import ServerUnavailable
from workbench.servers import free_port


def locked_then(method, failures: int, calls: list):
    """``method``, failing the first ``failures`` calls as SQLite's lock upgrade does."""

    def call(*args, **kwargs):
        calls.append(args)
        if len(calls) <= failures:
            raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) database is locked")
        return method(*args, **kwargs)

    return call


def test_a_call_that_finds_the_store_locked_is_made_again(tracking_uri, monkeypatch):
    monkeypatch.setattr(mlflow_runs.time, "sleep", lambda seconds: None)
    client = RetryingClient(tracking_uri)
    calls = []
    monkeypatch.setattr(client._client, "create_experiment", locked_then(client._client.create_experiment, 3, calls))
    experiment_id = client.create_experiment("after the lock")
    assert len(calls) == 4 and client.get_experiment(experiment_id).name == "after the lock"


def test_a_store_locked_for_good_and_other_errors_are_not_hidden(tracking_uri, monkeypatch):
    monkeypatch.setattr(mlflow_runs.time, "sleep", lambda seconds: None)
    client = RetryingClient(tracking_uri)
    calls = []
    monkeypatch.setattr(client._client, "create_experiment", locked_then(client._client.create_experiment, 99, calls))
    with pytest.raises(mlflow.exceptions.MlflowException, match="database is locked"):
        client.create_experiment("never")
    assert len(calls) == RetryingClient.ATTEMPTS
    with pytest.raises(mlflow.exceptions.MlflowException, match="not found"):  # not a lock: raised at once
        client.get_run("0" * 32)


def test_a_tracking_server_given_up_on_is_given_up_on_by_every_client_of_the_process(monkeypatch):
    """A single worker runs in tune.py's process, each with its own client: once one of them
    waited out --server-patience, the other's calls fail at once instead of waiting again."""
    monkeypatch.setattr(RetryingClient, "_given_up", {})
    for variable in ("BACKOFF_FACTOR", "MAX_RETRIES", "TIMEOUT"):  # what http_patience sets, put back after
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{variable}", "")
    http_patience(1)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    worker, study = RetryingClient(uri), RetryingClient(uri)
    with pytest.raises(ServerUnavailable, match=f"the MLflow tracking server {uri} did not answer"):
        worker.get_experiment("0")
    monkeypatch.setattr(study._client, "get_run", lambda *args: pytest.fail("asked a server given up on"))
    with pytest.raises(ServerUnavailable, match=f"the MLflow tracking server {uri} did not answer"):
        study.get_run("0" * 32)


def test_a_data_set_another_process_logged_first_is_linked_not_lost(tracking_uri, monkeypatch):
    """Two workers log the same new data set at one moment: the other one's insert lands between
    this call's look and its own insert, and the call fails on the dataset's key, as a
    PostgreSQL-backed server answers; made again, it links the data set the other one made."""
    tracker = connect(tracking_uri, "race")
    split = DataSplit("training", "digits", "0123abcd", "data", "existing files", (1, 28, 28))
    mine, theirs = tracker.create_run("mine"), tracker.create_run("theirs")
    real, calls = tracker.client._client.log_inputs, []

    def raced(run_id, datasets):
        calls.append(run_id)
        if len(calls) == 1:
            real(theirs, datasets=datasets)  # the other worker's insert wins
            raise mlflow.exceptions.RestException(
                {"error_code": "BAD_REQUEST", "message": '(psycopg.errors.UniqueViolation) duplicate key value '
                 'violates unique constraint "dataset_pk"'}
            )  # fmt: skip
        return real(run_id, datasets=datasets)

    monkeypatch.setattr(tracker.client._client, "log_inputs", raced)
    tracker.log_datasets(mine, [split])
    assert calls == [mine, mine]
    for run_id in (mine, theirs):
        [logged] = tracker.client.get_run(run_id).inputs.dataset_inputs
        assert (logged.dataset.name, logged.dataset.digest) == ("digits", "0123abcd")


def test_a_run_ends_with_the_status_its_block_deserves(tracking_uri):
    tracker = connect(tracking_uri, "ends")
    with tracker.run("fine") as fine:
        pass
    with pytest.raises(ValueError), tracker.run("broken") as broken:
        raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt), tracker.run("stopped") as stopped:
        raise KeyboardInterrupt
    with pytest.raises(StopIteration), tracker.run("done early", finished_on=(StopIteration,)) as early:
        raise StopIteration
    status = {run_id: tracker.client.get_run(run_id).info.status for run_id in (fine, broken, stopped, early)}
    assert status == {fine: "FINISHED", broken: "FAILED", stopped: "KILLED", early: "FINISHED"}
    assert tracker.client.get_run(broken).data.tags["error"] == "ValueError: boom"
