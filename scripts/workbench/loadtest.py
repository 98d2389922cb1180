"""A load test of the two servers that a study spread over many machines shares: PostgreSQL for
Optuna and `mlflow server` for MLflow, started on this machine (workbench.servers), under N
worker processes at once. scripts/loadtest.py runs it; docs/many-machines.md has its table.

Each N is a tune session of its own on a new study and a new MLflow experiment: tuning.tune()
with N workers, forked as tune.py's are, whose trials go through the whole machinery (ask and
tell with heartbeats, an MLflow run with its settings, data sets, a metric batch and a kept
state per epoch and the checkpoint, closed) around the tests' tiny experiment (tests/tiny), which trains in
milliseconds: a trial is almost all bookkeeping. The stores' calls are timed from outside the
machinery: every process, the workers' fork server included, wraps the Optuna storage's and the
MLflow client's methods (time_calls) and appends each call to a file of its own. The servers'
CPU is read from /proc.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np

from workbench import TESTS, python_path
from workbench.servers import cpu_seconds, mlflow_server, postgres, scratch_folder

# The tests' tiny experiment: its trials train in milliseconds, so what they cost is the stores.
# Each epoch is a metric batch, a kept state and an intermediate value: a few show their share.
EPOCHS = 3
# What each trial's run holds once per epoch.
EPOCH_METRICS = ("train_loss", "val_loss", "val_acc")
# Where each process writes the calls it timed (see time_calls): the workers' fork server finds
# it in its environment, and times its workers' calls from their first.
TIMINGS = "LOADTEST_TIMINGS"
# PostgreSQL's default, 100 connections, is fewer than 128 workers hold: each keeps one for its
# trials and one for its heartbeat thread, and the mlflow server's pool takes more.
MAX_CONNECTIONS = 400
# Trials a session may start: far more than fit in its seconds, which are what end it.
BUDGET = 1_000_000
KINDS = {"optuna": "Optuna", "mlflow": "MLflow"}
SERVERS = ("PostgreSQL", "mlflow server")
COLUMNS = (
    "workers", "trials", "seconds", "trials/s", "Optuna call ms (p50 / p95)", "MLflow call ms (p50 / p95)",
    "errors", "retries", "PostgreSQL CPU", "mlflow server CPU", "workers' CPU",
)  # fmt: skip


@dataclass
class Phase:
    """One N's figures, and its checks: what each says, and whether it held."""

    workers: int
    trials: int  # complete
    seconds: float  # the workers' wall time: from their start to the last one's end
    waits: dict[str, list[float]]  # seconds each call waited, by kind (KINDS)
    errors: Counter  # calls that raised, by kind and error
    retries: Counter  # by who retried (optuna, mlflow, http) and why
    cpu: dict[str, float]  # CPU seconds used during the phase: SERVERS', the workers', the machine's
    checks: list[tuple[str, bool]] = field(default_factory=list)

    def cores(self, what: str) -> float:
        return self.cpu[what] / self.seconds

    def cpu_per_trial(self, what: str) -> float:
        return self.cpu[what] / max(self.trials, 1)


def run(counts: Sequence[int], seconds: float, say: Callable[[str], None] = print, keep: bool = False) -> list[Phase]:
    """Start PostgreSQL and an mlflow server in a scratch folder, run a phase of ``seconds`` for
    each worker count of ``counts``, and remove the folder (unless ``keep``: its logs, the
    servers' data and the timed calls); ``say`` each phase's checks as it ends."""
    from tunetrack.machinery.options import TuneOptions
    from tunetrack.machinery.study import fork_server
    from tunetrack.machinery.tracking.mlflow_runs import http_patience

    folder = scratch_folder("tunetrack-loadtest-")
    try:
        (folder / "timings").mkdir()
        # The fork server imports the tiny experiment and this module, which times its calls there.
        os.environ[TIMINGS] = str(folder / "timings")
        os.environ["PYTHONPATH"] = python_path(TESTS)
        sys.path.insert(0, str(TESTS))
        time_calls(folder / "timings")
        http_patience(TuneOptions.server_patience)  # as tune.py sets MLflow's client

        from tiny.experiment import EXPERIMENT
        from tiny.settings import TinySettings

        settings = TinySettings(data_dir=str(folder / "data"), max_epochs=EPOCHS)
        with open(folder / "workers.log", "w") as log, _output_to(log):  # their lines, and the data's, not the table's
            fork_server.start(["tiny.experiment", __name__])
            EXPERIMENT.build(settings)[1].prepare_data()  # written and verified once, before any worker starts
        with (
            postgres(folder / "postgres", settings=(f"max_connections={MAX_CONNECTIONS}",)) as database,
            mlflow_server(database.url("mlflow"), folder / "mlflow") as tracking,
        ):
            phases = []
            for workers in counts:
                say(f"{workers} workers: {seconds:.0f} s of trials")
                phases.append(run_phase(workers, seconds, database, tracking, settings, folder))
                for what, held in phases[-1].checks:
                    say(f"{'ok' if held else 'FAILED'}  {workers} workers: {what}")
            return phases
    finally:
        if keep:
            say(f"kept {folder}: the logs, the servers' data and the timed calls")
        else:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _output_to(log) -> Iterator[None]:
    """This process's standard output and error, as file descriptors, into ``log`` for the block:
    what a process started meanwhile inherits."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def run_phase(workers: int, seconds: float, database, tracking, settings, folder: Path) -> Phase:
    """A tune session of ``workers`` workers that start trials for ``seconds``, on a new study
    and MLflow experiment, its output in a log in ``folder``; its figures and checks."""
    from tiny.experiment import EXPERIMENT
    from tunetrack.machinery.options import TuneOptions
    from tunetrack.machinery.study import tuning
    from tunetrack.machinery.tracking.mlflow_runs import connect

    name = f"loadtest-{workers}-workers"
    options = TuneOptions(
        n_trials=BUDGET, workers=workers, accelerator="cpu", storage=database.url("optuna"),
        tracking_uri=tracking.url, study_name=name, experiment=name,
        pruning=False, fixed=("lr",),  # every trial runs all its epochs: a too-high rate would diverge
        repeats=0, baseline="none",  # the stores are measured, not the best
    ).resolved(settings)  # fmt: skip
    options = dataclasses.replace(options, registered_model="")  # nothing registered: resolved() names a model
    cpu = {
        SERVERS[0]: lambda: cpu_seconds(database.pid),
        SERVERS[1]: lambda: cpu_seconds(tracking.process.pid),
        # The load test's own processes: this one, the fork server and the workers.
        "workers": lambda: cpu_seconds(os.getpid()) - cpu_seconds(tracking.process.pid),
        "machine": _busy_seconds,  # all of it: what the rest leave over is another program's
    }
    measured: dict = {}
    run_workers = tuning.run_workers

    def timed(session, n_trials: int, count: int, report):
        # The phase is the workers' time, their deadline counted from their start: tune()'s own
        # opening and closing of the study are left out.
        session = dataclasses.replace(session, deadline=time.time() + seconds)
        before = {what: used() for what, used in cpu.items()}
        measured["start"] = time.time()
        try:
            return run_workers(session, n_trials, count, report)
        finally:
            measured["end"] = time.time()
            measured["cpu"] = {what: used() - before[what] for what, used in cpu.items()}

    with (
        open(folder / f"tune-{workers}.log", "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
        mock.patch.object(tuning, "run_workers", timed),
    ):
        result = tuning.tune(EXPERIMENT, settings, options, lambda: connect(tracking.url, name))
    trials = result.study.get_trials(deepcopy=False)
    complete = sum(trial.state.name == "COMPLETE" for trial in trials)
    phase = Phase(workers, complete, measured["end"] - measured["start"], {}, Counter(), Counter(), measured["cpu"])
    callers = _read_calls(folder / "timings", measured["start"], measured["end"], phase, tracking.port)
    phase.checks = [
        (f"every trial COMPLETE: {complete} of {len(trials)}", complete == len(trials) > 0),
        _runs_whole(tracking.url, name, trials),
        (f"no store error reached a worker as a failure: {'; '.join(result.problems) or 'none did'}",
         not result.problems),
        (f"every worker's calls timed: {callers} processes made them", callers >= workers),
    ]  # fmt: skip
    return phase


def _runs_whole(tracking_uri: str, experiment: str, trials) -> tuple[str, bool]:
    """Whether every trial has one MLflow run, FINISHED, with every epoch of EPOCH_METRICS."""
    from mlflow.tracking import MlflowClient

    from tunetrack.machinery.study.studies import RUN_ATTR

    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = {run.info.run_id: run for run in client.search_runs([experiment_id], max_results=50_000)}
    children = [run for run in runs.values() if "mlflow.parentRunId" in run.data.tags]

    def whole(trial) -> bool:
        run = runs.get(trial.user_attrs.get(RUN_ATTR))
        return (
            run is not None
            and run.info.status == "FINISHED"
            and all(
                sorted(m.step for m in client.get_metric_history(run.info.run_id, metric)) == list(range(EPOCHS))
                for metric in EPOCH_METRICS
            )
        )

    with ThreadPoolExecutor(8) as pool:
        held = sum(pool.map(whole, trials))
    what = f"every MLflow run FINISHED with its {EPOCHS} epochs of {', '.join(EPOCH_METRICS)}"
    return f"{what}: {held} of {len(trials)} trials, {len(children)} runs", held == len(trials) == len(children)


def table(phases: Sequence[Phase]) -> str:
    """The phases' figures as a markdown table: the waits in milliseconds, each server's CPU in
    cores (CPU seconds over wall seconds) and per trial."""

    def waits(phase: Phase, kind: str) -> str:
        waited = phase.waits.get(kind)
        return f"{_ms(np.median(waited))} / {_ms(np.percentile(waited, 95))}" if waited else "-"

    def server(phase: Phase, what: str) -> str:
        return f"{phase.cores(what):.2f} ({phase.cpu_per_trial(what) * 1000:.0f} ms/trial)"

    rows = [
        [
            str(phase.workers),
            str(phase.trials),
            f"{phase.seconds:.0f}",
            f"{phase.trials / phase.seconds:.2f}",
            waits(phase, "optuna"),
            waits(phase, "mlflow"),
            str(sum(phase.errors.values())),
            str(sum(phase.retries.values())),
            server(phase, SERVERS[0]),
            server(phase, SERVERS[1]),
            f"{phase.cores('workers'):.2f}",
        ]
        for phase in phases
    ]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def details(phases: Sequence[Phase]) -> list[str]:
    """Per phase: the calls a trial makes of each store, the CPU that other programs took
    meanwhile (none, on a machine left to the load test), and the errors and retries by name."""
    lines = []
    for phase in phases:
        per_trial = ", ".join(
            f"{KINDS[kind]} {len(phase.waits.get(kind, [])) / max(phase.trials, 1):.1f}" for kind in KINDS
        )
        others = phase.cores("machine") - sum(phase.cores(what) for what in (*SERVERS, "workers"))
        lines.append(f"{phase.workers} workers: calls a trial: {per_trial}; other programs' CPU: {others:.2f} cores")
        for what, counted in (("errors", phase.errors), ("retries", phase.retries)):
            if counted:
                lines.append(f"  {what}: " + ", ".join(f"{name} x{n}" for name, n in counted.most_common()))
    return lines


def ceiling(phases: Sequence[Phase]) -> str:
    """The trials a minute each server's CPU allows, from the most CPU a trial took it in any
    phase: the mlflow server is one process (one uvicorn worker: workbench.servers), so a core;
    PostgreSQL runs a process per connection, so a core each."""
    worst = {what: max(phase.cpu_per_trial(what) for phase in phases) for what in SERVERS}
    rates = {what: 60 / seconds if seconds else float("inf") for what, seconds in worst.items()}
    first = min(rates, key=rates.get)
    return (
        f"ceiling: a trial took up to {worst[SERVERS[1]] * 1000:.0f} ms of the mlflow server's CPU, which runs on one "
        f"core: at most {rates[SERVERS[1]]:.0f} trials a minute; and {worst[SERVERS[0]] * 1000:.0f} ms of "
        f"PostgreSQL's: {rates[SERVERS[0]]:.0f} trials a minute per core; {first} gives first"
    )


def _busy_seconds() -> float:
    """The CPU time this machine's cores have been busy since it started (/proc/stat)."""
    with open("/proc/stat") as stat:
        ticks = [int(tick) for tick in stat.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _read_calls(folder: Path, start: float, end: float, phase: Phase, port: int) -> int:
    """Add to ``phase`` the calls, errors and retries that started between ``start`` and
    ``end``; return how many processes made calls then. Of the HTTP client's retries, only those
    to the mlflow server (on ``port``) count: MLflow's telemetry retries its own host, which no
    machine without internet reaches."""
    callers = set()
    for path in folder.glob("*.tsv"):
        for line in path.read_text().splitlines():
            kind, name, started, seconds, error = line.split("\t")
            if not start <= float(started) <= end:
                continue
            if kind == "retry":
                if not name.startswith("http") or name.startswith(f"http 127.0.0.1:{port}"):
                    phase.retries[name] += 1
                continue
            callers.add(path.stem)
            phase.waits.setdefault(kind, []).append(float(seconds))
            if error:
                phase.errors[f"{kind} {name}: {error}"] += 1
    return len(callers)


_folder: list[Path] = []  # where time_calls() writes, once it ran in this process
_files: dict[int, int] = {}  # the file each process writes, by its id: a fork opens its own
_under_way = threading.local()  # the kinds of call this thread makes now: their own calls are their wait


def time_calls(folder: Path) -> None:
    """From now on, in this process and its forks, write to a file of each one's own in
    ``folder`` every call of the Optuna storage (machinery.study.storage.PatientStorage, each as long
    as the trial waits for it, its retries included) and of the MLflow client
    (machinery.tracking.mlflow_runs.RetryingClient), and every retry that the machinery or MLflow's HTTP
    client makes."""
    if _folder:
        return
    _folder.append(folder)
    import urllib3

    from tunetrack.machinery.study import storage as study_storage
    from tunetrack.machinery.tracking import mlflow_runs

    storage = study_storage.PatientStorage
    for name, method in list(vars(storage).items()):
        if callable(method) and hasattr(method, "__wrapped__"):  # a call that the storage made patient
            setattr(storage, name, _timed("optuna", name, method))
    transient, attribute, retried = storage._transient, mlflow_runs.RetryingClient.__getattr__, mlflow_runs.retried
    increment = urllib3.util.retry.Retry.increment

    def counted_transient(self, error: BaseException) -> bool:
        again = transient(self, error)
        if again:
            _retry("optuna", error)
        return again

    def timed_attribute(self, name: str):
        method = attribute(self, name)
        return _timed("mlflow", name, method) if callable(method) else method

    def counted_retried(call, attempts: int, again, pause: float):
        def counted(error: Exception) -> bool:
            if again(error):
                _retry("mlflow", error)
                return True
            return False

        return retried(call, attempts, counted, pause)

    def counted_increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        where = f"http {getattr(_pool, 'host', '?')}:{getattr(_pool, 'port', '?')}"
        _retry(where, error or f"status {getattr(response, 'status', '?')}")
        return increment(self, method, url, response, error, _pool, _stacktrace)

    storage._transient = counted_transient
    mlflow_runs.RetryingClient.__getattr__ = timed_attribute
    mlflow_runs.retried = counted_retried
    urllib3.util.retry.Retry.increment = counted_increment


def _timed(kind: str, name: str, call: Callable) -> Callable:
    @functools.wraps(call)
    def timed(*args, **kwargs):
        under_way = _under_way.__dict__.setdefault("kinds", set())
        if kind in under_way:  # a call of the same store's, made by the one being timed
            return call(*args, **kwargs)
        under_way.add(kind)
        started, clock, error = time.time(), time.perf_counter(), ""
        try:
            return call(*args, **kwargs)
        except BaseException as raised:
            error = type(raised).__name__
            raise
        finally:
            under_way.discard(kind)
            _write(kind, name, started, time.perf_counter() - clock, error)

    return timed


def _retry(who: str, why) -> None:
    _write("retry", f"{who}: {why if isinstance(why, str) else type(why).__name__}", time.time(), 0, "")


def _write(*fields) -> None:
    pid = os.getpid()
    if pid not in _files:
        _files[pid] = os.open(_folder[0] / f"{pid}.tsv", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(_files[pid], ("\t".join(map(str, fields)) + "\n").encode())  # one write: whole lines from any thread


# The workers' fork server imports this module (see run): its workers time their calls from their first.
if os.environ.get(TIMINGS):
    time_calls(Path(os.environ[TIMINGS]))
