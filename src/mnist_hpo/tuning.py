"""A tune.py session: open or continue the study, run its trials in workers, and leave the
results in the Optuna storage and in MLflow."""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from sqlalchemy.engine import make_url
from tqdm import tqdm

from mnist_hpo import interrupts, results, studies
from mnist_hpo.config import TrainConfig
from mnist_hpo.tracking import Tracker
from mnist_hpo.trial import RUN_ATTR, TrialReport, TrialSetup, close_run
from mnist_hpo.workers import Session, quiet_libraries, run_workers


@dataclass(frozen=True)
class SessionResult:
    study: optuna.Study
    parent_run_id: str
    problems: list[str]
    test: dict[str, float] | None


def public_url(storage_url: str) -> str:
    """The storage URL without its password, fit to print and to log."""
    return make_url(storage_url).render_as_string(hide_password=True)


def tune(
    tracker: Tracker,
    storage_url: str,
    study_name: str,
    n_trials: int,
    workers: int,
    timeout: float | None = None,
    *,
    base: TrainConfig | None = None,
    data_dir: str = "data",
    data_source: str = "existing files",
    pruning: bool = True,
    accelerator: str = "auto",
    verbose: bool = False,
) -> SessionResult:
    """Run ``n_trials`` more trials of the study (created on first use) in ``workers`` processes.

    ``base`` says how each trial trains (epochs, validation size, seed; TrainConfig's defaults
    if None); the search space replaces the rest. The first Ctrl-C stops the trials; the clean-up and the summary still
    run, and then KeyboardInterrupt is raised.
    """
    quiet_libraries(verbose)
    with interrupts.handling():
        storage = studies.open_storage(storage_url)
        study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize", load_if_exists=True)
        _close_what_dead_workers_left(tracker, storage, study_name)
        before = len(study.trials)
        where = f"{public_url(storage_url)}, study {study_name!r}"
        print(f"continuing {where}: {before} trials so far" if before else f"new study in {where}", flush=True)
        parent_run_id = _parent_run(
            tracker,
            study,
            {"study_name": study_name, "storage": public_url(storage_url), "objective": "val_loss (minimize)"},
        )
        setup = TrialSetup(base or TrainConfig(), study_name, parent_run_id, data_dir, accelerator, verbose)
        session = Session(storage_url, tracker.tracking_uri, tracker.experiment_id, setup, data_source, pruning, before)
        bar = tqdm(total=n_trials, desc="study", unit="trial", dynamic_ncols=True)

        def report(trial: TrialReport) -> None:
            bar.write(trial.line())
            bar.update()

        problems, test = [], None
        with tracker.closing(parent_run_id):
            try:
                problems = run_workers(session, n_trials, workers, timeout, report)
            finally:
                bar.close()
            interrupted = interrupts.requested()
            _close_what_dead_workers_left(tracker, storage, study_name)
            results.log_study_summary(study, tracker, parent_run_id)
            if not interrupted:
                test = results.evaluate_best_trial(study, tracker, parent_run_id, data_dir, accelerator)
            _print_summary(study, tracker, parent_run_id, storage_url, test)
            if interrupted:
                raise KeyboardInterrupt  # after the summary; the parent run ends KILLED
    return SessionResult(study, parent_run_id, problems, test)


def _parent_run(tracker: Tracker, study: optuna.Study, params: dict[str, object]) -> str:
    """The study's MLflow parent run, created on first use and reopened when the study continues.

    Its id is kept with the study, per tracking store; a second process starting at the same
    moment reads back whichever id was stored last and drops its own run.
    """
    run_id = studies.recorded_parent_run(study, tracker.tracking_uri)
    if run_id and tracker.reopen(run_id):
        return run_id
    run_id = tracker.create_run(study.study_name, tags={"optuna.study": study.study_name})
    tracker.log_params(run_id, params)
    winner = studies.record_parent_run(study, tracker.tracking_uri, run_id)
    if winner != run_id:
        tracker.delete_run(run_id)
        tracker.reopen(winner)
    return winner


def _close_what_dead_workers_left(tracker: Tracker, storage, study_name: str) -> None:
    for trial in studies.fail_dead_trials(storage, study_name):
        print(f"trial {trial.number} was left running by a process that is gone: marked FAIL", flush=True)
    running = tracker.running_runs("optuna.study", study_name)
    if not running:
        return
    finished = {trial.user_attrs.get(RUN_ATTR): trial for trial in studies.finished_trials(storage, study_name)}
    for run_id in running:
        if run_id in finished:  # the study's own run has no trial
            close_run(tracker, finished[run_id])
            print(f"MLflow run {run_id} of a finished trial was still RUNNING: marked KILLED", flush=True)


def _print_summary(study, tracker, parent_run_id, storage_url, test) -> None:
    counts = results.counts(study)
    print(
        f"\nstudy {study.study_name!r}: {len(study.trials)} trials, {counts['COMPLETE']} complete, "
        f"{counts['PRUNED']} pruned, {counts['FAIL']} failed"
    )
    best = results.best_trial(study)
    if best is None:
        print("no trial has completed yet")
    else:
        print(results.top_trials_table(study, n=5))
        print(
            f"best: trial {best.number} ({results.describe_params(best)}): "
            f"val_loss {best.value:.4f}, val_acc {best.user_attrs['val_acc']:.4f}"
        )
        if test:
            scores = f"test_acc {test['test_acc']:.4f}, test_loss {test['test_loss']:.4f}"
            print(f"test (the best trial's weights, evaluated once): {scores}")
    print(
        f"look at it: {tracker.ui_command()}   then {tracker.run_url(parent_run_id)}\n"
        f"the study: {public_url(storage_url)}, study {study.study_name!r}; the same command continues it"
    )
