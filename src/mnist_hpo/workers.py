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
from dataclasses import dataclass

import optuna
import torch

from mnist_hpo import interrupts, studies
from mnist_hpo.data import trust_verified
from mnist_hpo.search import make_pruner, make_sampler
from mnist_hpo.tracking import RetryingClient, Tracker
from mnist_hpo.training import TrainingDiverged
from mnist_hpo.trial import TrialReport, TrialSetup, close_run, objective


@dataclass(frozen=True)
class Session:
    """What the workers of one tune.py session share: the two stores, and how to run a trial."""

    storage_url: str
    tracking_uri: str
    experiment_id: str
    trial: TrialSetup
    data_source: str  # where tune.py found MNIST when it verified the files
    pruning: bool = True
    trials_before: int = 0  # trials the study held when this session started


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """One worker per core, up to 8: the SQLite stores stay at a handful of writers."""
    return min(available_cores(), 8)


def run_trials(session: Session, worker: int, claim: Callable[[], bool], report: Callable[[TrialReport], None]) -> None:
    """One worker: while ``claim()`` grants another trial, run it and ``report`` how it ended.

    A diverging trial (NaN loss) is recorded as failed and the study goes on; any other
    error, and Ctrl-C, ends this worker after Optuna and MLflow have closed the trial.
    """
    tracker = Tracker(RetryingClient(session.tracking_uri), session.tracking_uri, session.experiment_id)
    storage = studies.open_storage(session.storage_url, on_stale_trial=lambda study, trial: close_run(tracker, trial))
    study = optuna.load_study(
        study_name=session.trial.study_name,
        storage=storage,
        sampler=make_sampler(session.trial.base.seed, session.trials_before, worker),
        pruner=make_pruner(session.pruning),
    )
    run_objective = functools.partial(objective, setup=session.trial, tracker=tracker)
    tell = [lambda study, trial: report(TrialReport.of(trial))]
    while claim():
        study.optimize(run_objective, n_trials=1, catch=(TrainingDiverged,), callbacks=tell)


def run_workers(
    session: Session, n_trials: int, workers: int, timeout: float | None, report: Callable[[TrialReport], None]
) -> list[str]:
    """Run up to ``n_trials`` trials in ``workers`` processes; return the problems, if any.

    Every worker runs at least one trial (it paid for its start-up); the rest of the budget
    goes to whichever worker is free first. After Ctrl-C (see :mod:`mnist_hpo.interrupts`) it
    returns once every worker has closed its trial; ``interrupts.requested()`` then says so.
    """
    workers = min(workers, n_trials)
    context = mp.get_context("spawn")
    budget = _Budget(context, n_trials, workers, None if timeout is None else time.time() + timeout)
    threads = max(1, available_cores() // workers)
    if workers == 1:
        _prepare_worker(threads, session.trial.verbose)
        claim = budget.for_worker()
        try:
            run_trials(session, 0, lambda: not interrupts.requested() and claim(), report)
        except KeyboardInterrupt:
            pass  # the trial is closed
        return []

    reports = context.Queue()
    processes = [
        context.Process(target=_worker_main, args=(session, i, threads, budget, reports), name=f"tune-worker-{i}")
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
    """The trials to run, shared by the workers: one reserved for each worker, the rest for
    whoever asks first, and the time after which no more may start."""

    def __init__(self, context, n_trials: int, workers: int, deadline: float | None):
        self.shared = context.Value("i", n_trials - workers)
        self.cancelled = context.Value("b", False)
        self.deadline = deadline

    def for_worker(self) -> Callable[[], bool]:
        """One worker's claim: True while it may start another trial."""
        reserved = [True]

        def claim() -> bool:
            if self.cancelled.value or (self.deadline is not None and time.time() >= self.deadline):
                return False
            if reserved:
                reserved.clear()
                return True
            with self.shared.get_lock():
                if self.shared.value <= 0:
                    return False
                self.shared.value -= 1
                return True

        return claim

    def cancel(self) -> None:
        self.cancelled.value = True


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


def _worker_main(session: Session, index: int, threads: int, budget: _Budget, reports) -> None:
    _prepare_worker(threads, session.trial.verbose)
    trust_verified(session.trial.data_dir, session.data_source)
    parent = os.getppid()
    claim_budget = budget.for_worker()

    def claim() -> bool:
        # A worker whose tune.py was killed finishes its trial and stops there.
        return not interrupts.requested() and os.getppid() == parent and claim_budget()

    with interrupts.handling():
        try:
            run_trials(session, index, claim, reports.put)
        except KeyboardInterrupt:
            pass  # the trial is closed; tune.py prints the summary
