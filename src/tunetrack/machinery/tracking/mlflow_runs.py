"""MLflow: where runs go, and how a run starts and always ends.

The store is MLflow's own default tracking URI (``sqlite:///mlflow.db`` in the working
directory), so ``mlflow ui`` started in the same folder with no flags shows every run. Every
MLflow call of the project goes through a :class:`Tracker`: one store, one experiment, runs
that end FINISHED, FAILED or KILLED and never stay RUNNING.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import RestException
from mlflow.tracking import MlflowClient

from tunetrack.machinery.contract import DataSplit
from tunetrack.machinery.runtime import interrupts
from tunetrack.machinery.tracking import moved_store
from tunetrack.machinery.tracking.stores import (
    ServerUnavailable,
    create_once,
    disk_full,
    public,
    reason,
    retried,
    sqlite_path,
)

# MLflow accepts at most this many params in one log_batch call.
_MAX_PARAMS_PER_BATCH = 100
# The scripts print each run's link once, in their summary; MLflow would print one per run
# that ends on a tracking server, and a progress bar per artifact. Set on import: tune.py's
# workers are forks of a server that imported this module, not of tune.py.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow logs, traceback and all, every call that its database refuses (SQLite's busy timeout, a
# full disk), and then raises it: RetryingClient makes a locked call again, and says once that it
# waits; the rest is said in one line by whoever stops on it.
logging.getLogger("mlflow.store.db.utils").addFilter(
    lambda record: not record.getMessage().startswith("SQLAlchemy database error")
)


class TrackingUnavailable(RuntimeError):
    """The tracking URI or experiment cannot be used."""


class RetryingClient:
    """An MlflowClient whose calls Ctrl-C never cuts in half, that wait their turn when SQLite
    says "database is locked", and that go again on a new connection when a tracking server had
    closed the one they were sent on.

    A SQLite transaction reads before it writes; when two worker processes turn reader into
    writer at the same moment, SQLite fails one of them at once instead of letting it wait
    (two workers logging to one mlflow.db, say). MLflow rolls the failed call back
    whole, so it is safe to make again. A KeyboardInterrupt inside a call, by contrast, could
    leave its transaction open and the database locked for every other process (two workers
    would wait on each other after a Ctrl-C), so it is held until the call returns.
    """

    ATTEMPTS = 20
    _said_locked = False  # once a process: that it waits for another writer
    # Why each tracking server was given up on, in this process: every client of it fails at
    # once from then on (a single worker runs in tune.py's process; the study is stopping, and
    # each further client would otherwise wait out the whole --server-patience again).
    _given_up: dict[str, str] = {}

    def __init__(self, tracking_uri: str):
        self._client = MlflowClient(tracking_uri)
        self._uri = tracking_uri

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        @functools.wraps(method)
        def call(*args, **kwargs):
            if down := self._given_up.get(self._uri):  # it did not answer through all of MLflow's retries
                raise ServerUnavailable(down)

            def once():
                with interrupts.held():  # a Ctrl-C never leaves a transaction half done
                    return method(*args, **kwargs)

            return retried(once, self.ATTEMPTS, self._locked, pause=0.2)

        return call

    def _locked(self, error: Exception) -> bool:
        """Whether ``error`` is another writer's lock, to wait for; a server gone is given up on."""
        if not isinstance(error, mlflow.exceptions.MlflowException):
            return False
        if _STALE_CONNECTION in str(error):
            # A kept-alive connection that the server closed while this machine was away (its
            # network cut off, say): the request never reached it, and a new connection will.
            return True
        # MLflow's own retries ran out (see http_patience), or the server answers that its own
        # database does not (HTTP 503: a PostgreSQL it shares with the study, stopped).
        server_503 = isinstance(error, RestException) and error.error_code == "TEMPORARILY_UNAVAILABLE"
        if _SERVER_GONE in str(error) or server_503:
            server = f"the MLflow tracking server {public(self._uri)}"
            down = self._given_up[self._uri] = f"{server} did not answer: {reason(error, self._uri)}"
            raise ServerUnavailable(down) from None
        if "database is locked" not in str(error):
            return False
        if not RetryingClient._said_locked:
            RetryingClient._said_locked = True
            print(f"{public(self._uri)} is locked by another writer: waiting for it", file=sys.stderr, flush=True)
        return True


# How MLflow's client says that a tracking server did not answer, after its own retries; and
# how a request sent on a connection that the server had closed fails (MLflow does not retry a
# POST that failed so).
_SERVER_GONE = "failed with exception"
_STALE_CONNECTION = "Remote end closed connection without response"
# How PostgreSQL and SQLite refuse a row whose key another transaction inserted first.
_DUPLICATE_KEY = ("duplicate key value violates unique constraint", "UNIQUE constraint failed")


def lost_a_race(error: Exception) -> bool:
    """Whether the store refused a row because another process inserted the same key first:
    MLflow rolled the call back whole, and what the other process wrote can be read now."""
    return any(key in str(error) for key in _DUPLICATE_KEY)


def http_patience(seconds: float) -> None:
    """Make MLflow's client retry a tracking server that does not answer for about ``seconds``,
    in this process and the workers it starts: its pauses double from 1 s (1 + 2 + 4 + ... >=
    seconds), and a request that hangs (a server whose own database is down keeps it waiting
    for minutes) is given up after ``seconds`` too. MLflow's default is about four minutes of
    pauses and two minutes a request."""
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(max(1, math.ceil(math.log2(seconds + 1))))
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(seconds)))


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else MLflow's own default, resolved as MLflow resolves it."""
    return mlflow.get_tracking_uri()


@dataclass(frozen=True)
class Tracker:
    """One MLflow store and experiment; every run of a process goes through it."""

    client: RetryingClient
    tracking_uri: str
    experiment_id: str | None  # None: a tracker that only reads runs
    # True when the URI is MLflow's own default, which `mlflow ui` with no flags shows.
    is_default: bool = False

    @contextmanager
    def run(
        self,
        run_name: str,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        finished_on: tuple[type[BaseException], ...] = (),
        left_alone_on: tuple[type[BaseException], ...] = (),
    ) -> Iterator[str]:
        """Open a run and yield its id; it ends FINISHED, or FAILED or KILLED, never RUNNING.

        An exception in ``finished_on`` (a pruned trial, say) ends the run FINISHED and still
        propagates; one in ``left_alone_on`` (a trial that another process finished, and this
        run with it) leaves the run as it is.
        """
        run_id = self.create_run(run_name, parent_run_id=parent_run_id, tags=tags)
        with self.closing(run_id, finished_on=finished_on, left_alone_on=left_alone_on):
            yield run_id

    @contextmanager
    def closing(
        self,
        run_id: str,
        *,
        finished_on: tuple[type[BaseException], ...] = (),
        left_alone_on: tuple[type[BaseException], ...] = (),
    ) -> Iterator[str]:
        """End an open run when the block ends, with the status its outcome deserves. Where the
        block failed and the tracking server does not answer either, the block's error is the
        one raised: the run stays open, for a later session to close."""
        try:
            yield run_id
        except left_alone_on:
            raise
        except finished_on:
            self.end_run(run_id, "FINISHED")
            raise
        except (KeyboardInterrupt, SystemExit) as stop:
            why = interrupts.describe() if interrupts.requested() else f"interrupted ({type(stop).__name__})"
            with contextlib.suppress(ServerUnavailable):
                self.end_run(run_id, "KILLED", {"error": why})
            raise
        except BaseException as error:
            try:
                self.end_run(run_id, "FAILED", {"error": f"{type(error).__name__}: {error}"[:5000]})
            except Exception as closing:  # noqa: BLE001 - a server gone, a disk full: the block's error says it
                if not (isinstance(closing, ServerUnavailable) or disk_full(closing)):
                    raise
            raise
        else:
            self.end_run(run_id, "FINISHED")

    def create_run(
        self, run_name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str:
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        return self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id

    def end_run(self, run_id: str, status: str, tags: Mapping[str, Any] | None = None) -> None:
        """Set ``tags`` (why it ended, say) and end the run with ``status``."""
        if tags:
            self.set_tags(run_id, tags)
        self.client.set_terminated(run_id, status)

    def reopen(self, run_id: str) -> bool:
        """Mark an existing, undeleted run RUNNING again; False if this store has no such run."""
        try:
            if self.client.get_run(run_id).info.lifecycle_stage != "active":
                return False
        except mlflow.exceptions.MlflowException:
            return False  # a run of another store, or one that was removed
        self.client.update_run(run_id, status="RUNNING")
        return True

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    def runs_tagged(self, tag: str, value: str, *, running: bool = False) -> list[mlflow.entities.Run]:
        """This experiment's runs whose tag ``tag`` is exactly ``value`` (only RUNNING ones, with
        ``running``), whatever quotes ``value`` holds."""
        status = "attributes.status = 'RUNNING' AND " if running else ""
        runs = self.client.search_runs([self.experiment_id], status + _tag_filter(tag, value), max_results=50_000)
        return [run for run in runs if run.data.tags.get(tag) == value]

    def experiment_of(self, run_id: str) -> str | None:
        """The experiment of a run of this store; None if the store has no such run."""
        try:
            return self.client.get_run(run_id).info.experiment_id
        except mlflow.exceptions.MlflowException:
            return None

    def params(self, run_id: str) -> dict[str, str]:
        return self.client.get_run(run_id).data.params

    def metric_history(self, run_id: str, name: str) -> list[float]:
        """A metric's values in step order (one per epoch, for the curves)."""
        return [m.value for m in sorted(self.client.get_metric_history(run_id, name), key=lambda m: m.step)]

    def logged_steps(self, run_id: str) -> set[tuple[str, int]]:
        """Each (metric, step) that the run holds a value for."""
        metrics = self.client.get_run(run_id).data.metrics
        return {(name, m.step) for name in metrics for m in self.client.get_metric_history(run_id, name)}

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start : start + _MAX_PARAMS_PER_BATCH])

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int = 0, model_id: str | None = None
    ) -> None:
        """Log ``metrics`` on the run; with ``model_id``, as that logged model's too (its page
        in mlflow ui shows them)."""
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(key, float(value), now, step, model_id=model_id) for key, value in metrics.items()]
        )

    def log_datasets(self, run_id: str, splits: Sequence[DataSplit]) -> None:
        """Record what the run trained, validated and tested on as MLflow dataset inputs: mlflow ui
        shows them in the runs table's Datasets column and on the run's page."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.types import Schema, TensorSpec
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = []
        for split in splits:
            features = Schema([TensorSpec(np.dtype(split.dtypes[0]), (-1, *split.shape), "inputs")]).to_json()
            targets = Schema([TensorSpec(np.dtype(split.dtypes[1]), (-1,), "targets")]).to_json()
            schema = json.dumps({"mlflow_tensorspec": {"features": features, "targets": targets}})
            source = json.dumps({"uri": split.location})
            profile = json.dumps({"origin": split.origin})
            dataset = Dataset(split.name, split.digest, "local", source, schema, profile)
            inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, split.context)]))
        # Two workers' first trials log the same new data set at the same moment: both find it
        # missing and insert it, and the loser's call fails on the dataset's key (PostgreSQL
        # says so; SQLite may serialize them). MLflow rolls that call back whole; made again, it finds the data set
        # and only links it to the run.
        retried(lambda: self.client.log_inputs(run_id, datasets=inputs), attempts=3, again=lost_a_race, pause=0.5)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifact(self, run_id: str, local_path: str | os.PathLike, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, os.fspath(local_path), artifact_path=folder)

    def delete_artifacts(self, run_id: str, folder: str) -> None:
        """Remove a folder of the run's artifacts, where its store can (a local folder, a tracking
        server that serves artifacts); elsewhere it stays."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        with contextlib.suppress(NotImplementedError, OSError, mlflow.exceptions.MlflowException):
            uri = self.client.get_run(run_id).info.artifact_uri
            get_artifact_repository(uri, tracking_uri=self.tracking_uri).delete_artifacts(folder)

    def download_artifact(self, run_id: str, path: str, into: str | os.PathLike) -> str:
        """Fetch one of the run's artifacts into the folder ``into``; return its local path."""
        return self.client.download_artifacts(run_id, path, os.fspath(into))

    def run_url(self, run_id: str) -> str:
        """Where the run is in the UI: mlflow ui's default address, or the tracking server's."""
        base = self.tracking_uri if self.tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def ui_command(self) -> str:
        """The command that shows this store: plain ``mlflow ui`` for the default one."""
        if self.is_default:
            return "mlflow ui"
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"open {self.tracking_uri}"
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"


def _tag_filter(tag: str, value: str) -> str:
    """A search filter that matches tag ``tag`` equal to ``value``, or a few more runs where it
    cannot be exact: MLflow's filter strings have no escape, so a value holding both kinds of
    quote is matched with LIKE, each quote standing for any one character."""
    if "'" not in value:
        return f"tags.`{tag}` = '{value}'"
    if '"' not in value:
        return f'tags.`{tag}` = "{value}"'
    return f"tags.`{tag}` LIKE '{value.replace(chr(39), '_').replace(chr(34), '_')}'"


def reader(tracking_uri: str | None) -> Tracker:
    """A tracker that reads runs by id (their curves, say) and writes nothing."""
    uri = tracking_uri or default_tracking_uri()
    return Tracker(RetryingClient(uri), uri, None)


def connect(tracking_uri: str | None, experiment: str) -> Tracker:
    """Open the store (creating it on first use) and the experiment; fail in one line."""
    is_default = tracking_uri is None and "MLFLOW_TRACKING_URI" not in os.environ
    uri = tracking_uri or default_tracking_uri()
    # Nor its INFO lines: "Creating initial MLflow database tables..." when it makes a new
    # store, and "Waiting up to 300 seconds for model version..." when it registers a model
    # through a server. The scripts' own lines say which store, and what was registered.
    for chatty in ("mlflow.store.db.utils", "mlflow.store.model_registry.abstract_store"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        follow_a_moved_folder(uri)
        client, experiment_id = create_once(uri, lambda: _open(uri, experiment), _make_tables)
        return Tracker(client, uri, experiment_id, is_default)
    except Exception as error:  # noqa: BLE001 - whatever MLflow raises, the URI is unusable
        why = reason(error, uri)
        if disk_full(error):
            why += ": free some space on its disk, and run again"
        elif "already exists" in why and sqlite_path(uri) is not None:
            why += (": it was left half-made when it was first made (by an older version of this project, on a "
                    "full disk, say); if it holds no runs, delete it and run again")  # fmt: skip
        raise TrackingUnavailable(f"cannot use the MLflow store {public(uri)!r}: {why}") from error


def follow_a_moved_folder(uri: str) -> None:
    """A SQLite store in a folder that moved: its artifact locations follow it (see
    machinery.tracking.moved_store), and one line on stderr says so (predict.py's stdout is its answers)."""
    path = sqlite_path(uri)
    if path is not None and os.access(path, os.W_OK) and (note := moved_store.follow(path)):
        print(note, file=sys.stderr, flush=True)


def _make_tables(uri: str) -> None:
    """A new store's tables, as MLflow makes them on its first use, and nothing else."""
    client = MlflowClient(uri)
    client.search_experiments()
    client._tracking_client.store.engine.dispose()  # the file is about to take another name


def _open(uri: str, experiment: str) -> tuple[RetryingClient, str]:
    client = RetryingClient(uri)  # MLflow makes a database's tables here, on first use
    return client, _experiment_id(client, experiment)


def _experiment_id(client: RetryingClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except mlflow.exceptions.MlflowException:
            # Another worker created it a moment ago.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
        print(f"the MLflow experiment {name!r} was deleted: it is restored, with its runs", flush=True)
    return experiment.experiment_id
