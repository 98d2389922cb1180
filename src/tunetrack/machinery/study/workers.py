"""Running a study's trials: one worker's loop, and N worker processes on one machine.

Small matrices leave most of a core idle inside one process, so N single-threaded workers
train more epochs per second than one N-threaded process. Each worker is a fork of a server
that imported what it needs (machinery.study.fork_server) and runs trials back to back; the tune.py
process hands out the trial budget and prints what they report. With one worker, the trials
run in the tune.py process itself.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch

from tunetrack.machinery.data import files
from tunetrack.machinery.runtime import collector, console, devices, interrupts
from tunetrack.machinery.runtime.user_files import import_files
from tunetrack.machinery.study import fork_server, studies
from tunetrack.machinery.study.fork_server import available_cores
from tunetrack.machinery.study.kept_state import close_run
from tunetrack.machinery.study.samplers import make_pruner, make_sampler
from tunetrack.machinery.study.storage import open_storage
from tunetrack.machinery.study.studies import TakenOver
from tunetrack.machinery.study.summary import TrialReport
from tunetrack.machinery.study.trial import Session, run_trial
from tunetrack.machinery.tracking.mlflow_runs import RetryingClient, Tracker
from tunetrack.machinery.tracking.stores import DISK_FULL, disk_full, reason


@dataclass(frozen=True)
class WorkerFailed:
    """What a worker reports, instead of a trial, when an error ends it: one line."""

    worker: int
    message: str


def default_workers() -> int:
    """One worker per core, up to 8: the SQLite stores stay at a handful of writers. The same on
    GPUs, dealt to them in turn (machinery.runtime.devices): a worker's steps are small kernels that
    wait on its Python, so a core per worker is what it needs, whichever device does the
    arithmetic; cli.checks.check_workers keeps them to what the GPUs' memory holds."""
    return min(available_cores(), 8)


def run_trials(session: Session, claim: Callable[[], bool], report: Callable[[TrialReport], None]) -> None:
    """One worker: while ``claim()`` grants another trial, run it and ``report`` how it ended.

    A diverging trial (its loss no number, or no better than chance after its first epoch) is
    pruned and the study goes on; an error of the trial's own, and Ctrl-C, end this worker after
    Optuna and MLflow have closed the trial (and reported it).
    """
    tracker = Tracker(RetryingClient(session.tracking_uri), session.tracking_uri, session.experiment_id)
    options = session.options

    def close_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # Optuna found a trial (of any machine) silent for the grace period, and failed it.
        close_run(tracker, trial)
        silent = f"its heartbeat stopped for over {options.grace_period} s"
        report(TrialReport.of(trial, note=f"{silent}: its process died, or was stopped or cut off"))

    storage = open_storage(options.storage, options.grace_period, close_stale, options.server_patience)
    study = optuna.load_study(
        study_name=options.study_name,
        storage=storage,
        sampler=make_sampler(
            options.sampler, session.settings.seed, {name: getattr(session.settings, name) for name in options.fixed}
        ),
        pruner=make_pruner(options.pruner, options.pruning, session.settings.max_epochs),
    )
    running: list[int] = []  # the id of the trial this worker runs now
    failed: list[BaseException] = []  # what the trial's own code raised, if it did

    def run_objective(trial: optuna.Trial) -> float:
        running[:], failed[:] = [trial._trial_id], []
        try:
            return run_trial(trial, session, tracker, storage)
        except BaseException as error:
            failed.append(error)
            raise

    tell = [lambda study, trial: report(TrialReport.of(trial))]
    given_up = f"given up by another process after {options.grace_period} s without a heartbeat"
    try:
        while claim():
            if options.until is not None and studies.toward_total(storage, options.study_name) >= options.until:
                break  # the study holds its total, with the trials of every machine
            # A trial that died on any machine goes back to the study first, for this ask() to take up.
            for dead in studies.take_back_dead_trials(
                storage, options.study_name, options.grace_period, options.resume_attempts, silent=True
            ):
                close_run(tracker, dead)
                report(TrialReport.of(dead))
            try:
                study.optimize(run_objective, n_trials=1, callbacks=tell)
            except TakenOver:  # handed back while this worker was away, and taken up by another
                report(TrialReport.left(storage.get_trial(running[0]), f"{given_up}: this attempt is discarded"))
            except ValueError as error:  # Optuna's "Cannot tell a ... trial": another process had finished it
                if error in failed or not (running and (trial := storage.get_trial(running[0])).state.is_finished()):
                    raise  # the trial's own error, which Optuna recorded and re-raised
                report(TrialReport.left(trial, f"{given_up}: this result is discarded"))
            running.clear()
    except BaseException:
        # Optuna told the trial FAIL (or handed it back) before it re-raised, but calls no callback for it.
        if running and (trial := storage.get_trial(running[0])).state != optuna.trial.TrialState.RUNNING:
            report(TrialReport.of(trial))
        raise


def run_workers(session: Session, n_trials: int, workers: int, report: Callable[[TrialReport], None]) -> list[str]:
    """Run up to ``n_trials`` trials in ``workers`` processes; return the problems, one line each.

    Every worker runs at least one trial (it paid for its start-up), whatever the deadline;
    the rest of the budget goes to whichever worker is free first, until the deadline. After
    Ctrl-C (see :mod:`machinery.runtime.interrupts`) it returns once every worker has closed its
    trial; ``interrupts.requested()`` then says so.
    """
    workers = min(workers, n_trials)
    context = fork_server.CONTEXT
    if workers > 1:
        fork_server.start()  # tune.py started it already, with the experiment imported
    budget = _Budget(context, n_trials, workers, session.deadline)
    threads = max(1, available_cores() // workers)
    gpus = devices.assign(workers, devices.training_gpus(session.options.accelerator))  # here, not in a fork
    if workers == 1:
        _prepare_worker(threads, session.options.verbose)
        try:
            with devices.trained_on(gpus[0]):
                run_trials(session, budget.for_worker(), report)
        except KeyboardInterrupt:
            pass  # the trial is closed
        except Exception as error:  # noqa: BLE001 - any error ends the study, in one line
            return [_one_line(error, session)]
        return []

    reports = context.Queue()
    processes = [
        context.Process(
            target=_worker_main,
            args=(
                _Start(
                    pickle.dumps(session), session.options.imports, i, threads, files.verified(), os.getpid(), gpus[i]
                ),
                budget,
                reports,
            ),  # fmt: skip
            name=f"tune-worker-{i}",
        )
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    problems, forwarded = [], False
    try:
        while any(p.is_alive() for p in processes) or not reports.empty():
            if interrupts.requested() and not forwarded:
                # A terminal's Ctrl-C, or a signal to the whole process group, reached every
                # worker too; this reaches those it did not (a SIGTERM to tune.py alone).
                forwarded = True
                budget.cancel()
                for process in processes:
                    if process.is_alive():
                        os.kill(process.pid, interrupts.requested())
            try:
                message = reports.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(message, WorkerFailed):
                budget.cancel()  # an error ends the study: the other workers finish their trial
                problems.append(f"worker {message.worker}: {message.message}")
            else:
                report(message)
    finally:
        for process in processes:
            process.join()
    reported = {problem.split(":")[0] for problem in problems}
    return problems + [
        f"worker {i} exited with code {p.exitcode}"
        for i, p in enumerate(processes)
        if p.exitcode != 0 and f"worker {i}" not in reported
    ]


class _Budget:
    """The trials to run, shared by the workers: one reserved for each worker, the rest for
    whoever asks first, and the time after which no more may start."""

    def __init__(self, context, n_trials: int, workers: int, deadline: float | None):
        # One worker runs in tune.py itself: a thread's lock, and no process to release it.
        lock = context.RLock() if workers > 1 else threading.RLock()
        self.shared = context.Value("i", n_trials - workers, lock=lock)
        self.cancelled = context.Value("b", False, lock=lock)
        self.deadline = deadline

    def for_worker(self) -> Callable[[], bool]:
        """One worker's claim: True while it may start another trial (never once it was asked
        to stop)."""
        reserved = [True]

        def claim() -> bool:
            if self.cancelled.value or interrupts.requested():
                return False
            if reserved:  # its first trial, whatever the time
                reserved.clear()
                return True
            if self.deadline is not None and time.time() >= self.deadline:
                return False
            with self.shared.get_lock():
                if self.shared.value <= 0:
                    return False
                self.shared.value -= 1
                return True

        return claim

    def cancel(self) -> None:
        self.cancelled.value = True


def quiet_libraries(verbose: bool) -> None:
    """Inside a study one line per trial says enough: Optuna keeps to errors (its warning about
    a failed trial, traceback included, repeats what that trial's line says), and Lightning,
    unless ``verbose``, to warnings."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if not verbose:
        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
        logging.getLogger("lightning_fabric").setLevel(logging.WARNING)


def _prepare_worker(threads: int, verbose: bool) -> None:
    collector.freeze_imports()  # a fork of the server, which imported it all with the collector paused
    console.forgive()  # a worker's lines (a library's warning, say) share tune.py's stdout and stderr
    torch.set_num_threads(threads)
    quiet_libraries(verbose)


def _one_line(error: BaseException, session: Session) -> str:
    """An error that ends the study, as one line that shows no password (and, with --verbose,
    its traceback on stderr first)."""
    if session.options.verbose:
        traceback.print_exception(error)
    if disk_full(error):
        return DISK_FULL
    return f"{type(error).__name__}: {reason(error, session.options.storage, session.tracking_uri)}"


@dataclass(frozen=True)
class _Start:
    """What a worker process starts from."""

    # The session, pickled here and read back once the worker has imported the files of
    # --import: it holds the experiment, whose registries may hold what those files define.
    pickled: bytes
    imports: tuple[str, ...]
    index: int
    threads: int
    verified: dict  # the data files tune.py checked (machinery.data.files)
    tune_py: int  # its pid: the worker does not outlive it
    gpu: devices.Assigned | None


def _worker_main(start: _Start, budget: _Budget, reports) -> None:
    devices.see_only(start.gpu)  # first: what --import or the session's experiment imports may start CUDA
    import_files(None, start.imports)  # what they register, this worker needs too: before the session is read
    session: Session = pickle.loads(start.pickled)
    _prepare_worker(start.threads, session.options.verbose)
    files.trust(start.verified)  # tune.py checked the data before it started the workers
    with interrupts.handling():
        interrupts.end_with(start.tune_py)  # however tune.py ends, this worker does not outlive it
        try:
            run_trials(session, budget.for_worker(), reports.put)
        except KeyboardInterrupt:
            pass  # the trial is closed; tune.py prints the summary
        except Exception as error:  # noqa: BLE001 - reported in one line by tune.py
            reports.put(WorkerFailed(start.index, _one_line(error, session)))
