"""MLflow: where runs go, how a run starts and always ends, and how Lightning's metrics get there.

The store is MLflow's own default tracking URI (``sqlite:///mlflow.db`` in the working
directory), so ``mlflow ui`` started in the same folder with no flags shows every run.
Lightning's MLFlowLogger is not used: its default is a ./mlruns file store that ``mlflow ui``
does not show, it logs epoch-level metrics against the global step, and it marks a run FAILED
on any exception, a pruned trial's included. Runs are opened and closed here instead, through
one MlflowClient, and :class:`EpochMetricsLogger` hands Lightning's metrics over with
step = epoch.
"""

from __future__ import annotations

import functools
import os
import random
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers import Logger

DEFAULT_EXPERIMENT = "mnist"
# MLflow accepts at most this many params in one log_batch call.
_MAX_PARAMS_PER_BATCH = 100


class TrackingUnavailable(RuntimeError):
    """The tracking URI or experiment cannot be used."""


class RetryingClient:
    """An MlflowClient whose calls wait their turn when SQLite says "database is locked".

    A SQLite transaction reads before it writes; when two worker processes turn reader into
    writer at the same moment, SQLite fails one of them at once instead of letting it wait
    (seen here with two workers logging to mlflow.db). MLflow rolls the failed call back
    whole, so it is safe to make again.
    """

    ATTEMPTS = 20

    def __init__(self, tracking_uri: str):
        self._client = MlflowClient(tracking_uri)

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        @functools.wraps(method)
        def call(*args, **kwargs):
            for attempt in range(self.ATTEMPTS):
                try:
                    return method(*args, **kwargs)
                except mlflow.exceptions.MlflowException as error:
                    if "database is locked" not in str(error) or attempt == self.ATTEMPTS - 1:
                        raise
                    time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))

        return call


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else MLflow's own default, resolved as MLflow resolves it."""
    return mlflow.get_tracking_uri()


@dataclass(frozen=True)
class Tracker:
    """One MLflow store and experiment; every run of a process goes through it."""

    client: RetryingClient
    tracking_uri: str
    experiment_id: str
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
    ) -> Iterator[str]:
        """Open a run and yield its id; it ends FINISHED, or FAILED or KILLED, never RUNNING.

        An exception in ``finished_on`` (a pruned trial, say) ends the run FINISHED and still
        propagates.
        """
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
        with self.closing(run_id, finished_on=finished_on):
            yield run_id

    @contextmanager
    def closing(self, run_id: str, *, finished_on: tuple[type[BaseException], ...] = ()) -> Iterator[str]:
        """End an open run when the block ends, with the status its outcome deserves."""
        try:
            yield run_id
        except finished_on:
            self.client.set_terminated(run_id, "FINISHED")
            raise
        except (KeyboardInterrupt, SystemExit) as stop:
            self.client.set_tag(run_id, "error", f"interrupted ({type(stop).__name__})")
            self.client.set_terminated(run_id, "KILLED")
            raise
        except BaseException as error:
            self.client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
            self.client.set_terminated(run_id, "FAILED")
            raise
        else:
            self.client.set_terminated(run_id, "FINISHED")

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start : start + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

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


def connect(tracking_uri: str | None, experiment: str) -> Tracker:
    """Open the store (creating it if need be) and the experiment; fail early, in one line."""
    is_default = tracking_uri is None and "MLFLOW_TRACKING_URI" not in os.environ
    uri = tracking_uri or default_tracking_uri()
    try:
        if uri.startswith(("http://", "https://")):
            # MLflow's client retries an unreachable server for minutes; one probe says it now.
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
        client = RetryingClient(uri)
        return Tracker(client, uri, _experiment_id(client, experiment), is_default)
    except Exception as error:  # noqa: BLE001 - whatever MLflow raises, the URI is unusable
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrackingUnavailable(f"cannot use the MLflow store {uri!r}: {message}") from error


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
    return experiment.experiment_id


class EpochMetricsLogger(Logger):
    """Sends what the LightningModule logs to an MLflow run, with step = epoch.

    Lightning adds the current epoch to every batch of epoch-level metrics it hands a logger;
    one log_batch call per batch keeps the store's writes to a couple per epoch. The run's
    lifecycle is the caller's (see :meth:`Tracker.run`), so ``finalize`` leaves it alone.
    """

    def __init__(self, tracker: Tracker, run_id: str):
        super().__init__()
        self.tracker, self.run_id = tracker, run_id

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run_id

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the caller logs every setting itself, once, before training starts

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = dict(metrics)
        epoch = int(metrics.pop("epoch"))
        self.tracker.log_metrics(self.run_id, metrics, step=epoch)


def log_torch_model(tracker: Tracker, run_id: str, module, input_example) -> None:
    """Log ``module`` with mlflow.pytorch, with a signature and an input example, so that
    ``mlflow.pytorch.load_model`` gives it back."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        output = module(torch.from_numpy(input_example)).numpy()
    mlflow.set_tracking_uri(tracker.tracking_uri)  # log_model works through MLflow's fluent API
    mlflow.pytorch.log_model(
        module,
        name="model",
        run_id=run_id,
        signature=infer_signature(input_example, output),
        input_example=input_example,
        # Stated, not inferred: inference imports the model in a subprocess, for many seconds.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
