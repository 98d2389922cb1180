"""Running a study's trials: one worker's loop, and N worker processes on one machine.

Small matrices leave most of a core idle inside one process, so N single-threaded workers
train more epochs per second than one N-threaded process. Each worker is a spawned process
(no fork after torch has started its threads) that pays its start-up once and then runs
trials back to back; the tune.py process hands out the trial budget and prints what they
report. With one worker, the trials run in the tune.py process itself.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import queue
import signal
import time
from collections.abc import Callable

import optuna
import torch

from mnist_hpo import interrupts, studies
from mnist_hpo.data import trust_verified
from mnist_hpo.search import TrialReport, TuneSettings, make_pruner, make_sampler, objective
from mnist_hpo.tracking import RetryingClient, Tracker
from mnist_hpo.training import TrainingDiverged


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """One worker per core, up to 8: the SQLite stores stay at a handful of writers."""
    return min(available_cores(), 8)


def run_trials(
    settings: TuneSettings, worker: int, claim: Callable[[], bool], report: Callable[[TrialReport], None]
) -> None:
    """One worker: while ``claim()`` grants another trial, run it and ``report`` how it ended.

    A diverging trial (NaN loss) is recorded as failed and the study goes on; any other
    error, and Ctrl-C, ends this worker after Optuna and MLflow have closed the trial.
    """
    tracker = Tracker(RetryingClient(settings.tracking_uri), settings.tracking_uri, settings.experiment_id)
    storage = studies.open_storage(
        settings.storage, on_stale_trial=lambda study, trial: studies.close_run_of_failed_trial(tracker, trial)
    )
    study = optuna.load_study(
        study_name=settings.study_name,
        storage=storage,
        sampler=make_sampler(settings, worker),
        pruner=make_pruner(settings),
    )
    run_objective = functools.partial(objective, settings=settings, tracker=tracker)
    tell = [lambda study, trial: report(TrialReport.of(trial))]
    while claim():
        study.optimize(run_objective, n_trials=1, catch=(TrainingDiverged,), callbacks=tell)


def run_workers(
    settings: TuneSettings, n_trials: int, workers: int, timeout: float | None, report: Callable[[TrialReport], None]
) -> list[str]:
    """Run up to ``n_trials`` trials in ``workers`` processes; return the problems, if any.

    After Ctrl-C (see :mod:`mnist_hpo.interrupts`) it returns once every worker has closed its
    trial; ``interrupts.requested()`` then says so.
    """
    context = mp.get_context("spawn")
    budget = _Budget(context, n_trials, None if timeout is None else time.time() + timeout)
    threads = max(1, available_cores() // workers)
    if workers == 1:
        _prepare_worker(threads, settings.verbose)
        try:
            run_trials(settings, 0, lambda: not interrupts.requested() and budget.claim(), report)
        except KeyboardInterrupt:
            pass  # the trial is closed
        return []

    reports = context.Queue()
    processes = [
        context.Process(target=_worker_main, args=(settings, i, threads, budget, reports), name=f"tune-worker-{i}")
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    forwarded = False
    try:
        while any(p.is_alive() for p in processes) or not reports.empty():
            if interrupts.requested() and not forwarded:
                # The terminal sent SIGINT to every worker too; this reaches those it did not.
                forwarded = True
                budget.cancel()
                for process in processes:
                    if process.is_alive():
                        os.kill(process.pid, signal.SIGINT)
            try:
                report(reports.get(timeout=0.2))
            except queue.Empty:
                pass
    finally:
        for process in processes:
            process.join()
    return [f"worker {i} exited with code {p.exitcode}" for i, p in enumerate(processes) if p.exitcode != 0]


class _Budget:
    """Trials left to start, and the time after which none may start, shared by the workers."""

    def __init__(self, context, n_trials: int, deadline: float | None):
        self.left = context.Value("i", n_trials)
        self.deadline = deadline

    def claim(self) -> bool:
        if self.deadline is not None and time.time() >= self.deadline:
            return False
        with self.left.get_lock():
            if self.left.value <= 0:
                return False
            self.left.value -= 1
            return True

    def cancel(self) -> None:
        with self.left.get_lock():
            self.left.value = 0


def quiet_libraries(verbose: bool) -> None:
    """Inside a study one line per trial says enough: Optuna, and Lightning unless ``verbose``,
    keep to warnings."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not verbose:
        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
        logging.getLogger("lightning_fabric").setLevel(logging.WARNING)


def _prepare_worker(threads: int, verbose: bool) -> None:
    torch.set_num_threads(threads)
    quiet_libraries(verbose)


def _worker_main(settings: TuneSettings, index: int, threads: int, budget: _Budget, reports) -> None:
    _prepare_worker(threads, settings.verbose)
    trust_verified(settings.data_dir, settings.data_source)
    parent = os.getppid()

    def claim() -> bool:
        # A worker whose tune.py was killed finishes its trial and stops there.
        return not interrupts.requested() and os.getppid() == parent and budget.claim()

    with interrupts.handling():
        try:
            run_trials(settings, index, claim, reports.put)
        except KeyboardInterrupt:
            pass  # the trial is closed; tune.py prints the summary
