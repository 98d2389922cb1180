"""A tune.py session: open or continue the study, run its trials in workers, and leave the
results in the Optuna storage and in MLflow."""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from sqlalchemy.engine import make_url
from tqdm import tqdm

from mnist_hpo import interrupts, results, studies
from mnist_hpo.search import TrialReport, TuneSettings
from mnist_hpo.tracking import Tracker
from mnist_hpo.workers import quiet_libraries, run_workers


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
    **settings,
) -> SessionResult:
    """Run ``n_trials`` more trials of the study (created on first use) in ``workers`` processes.

    ``settings`` are :class:`TuneSettings` fields: data_dir, max_epochs, seed, pruning, ...
    The first Ctrl-C stops the trials; the clean-up and the summary still run, and then
    KeyboardInterrupt is raised.
    """
    quiet_libraries(settings.get("verbose", False))
    with interrupts.handling():
        return _session(tracker, storage_url, study_name, n_trials, workers, timeout, settings)


def _session(tracker, storage_url, study_name, n_trials, workers, timeout, settings) -> SessionResult:
    storage = studies.open_storage(storage_url)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize", load_if_exists=True)
    _close_what_dead_workers_left(tracker, storage, study_name)
    before = len(study.trials)
    where = f"{public_url(storage_url)}, study {study_name!r}"
    print(f"continuing {where}: {before} trials so far" if before else f"new study in {where}", flush=True)
    parent_run_id = studies.parent_run(
        tracker,
        study,
        {"study_name": study_name, "storage": public_url(storage_url), "objective": "val_loss (minimize)"},
    )
    settings = TuneSettings(
        study_name=study_name,
        storage=storage_url,
        tracking_uri=tracker.tracking_uri,
        experiment_id=tracker.experiment_id,
        parent_run_id=parent_run_id,
        trials_before=before,
        **settings,
    )
    bar = tqdm(total=n_trials, desc="study", unit="trial", dynamic_ncols=True)

    def report(trial: TrialReport) -> None:
        bar.write(trial.line())
        bar.update()

    problems, test = [], None
    with tracker.closing(parent_run_id):
        try:
            problems = run_workers(settings, n_trials, workers, timeout, report)
        finally:
            bar.close()
        interrupted = interrupts.requested()
        _close_what_dead_workers_left(tracker, storage, study_name)
        results.log_study_summary(study, tracker, parent_run_id)
        if not interrupted:
            test = results.evaluate_best_trial(study, tracker, parent_run_id, settings.data_dir, settings.accelerator)
        _print_summary(study, tracker, parent_run_id, storage_url, test)
        if interrupted:
            raise KeyboardInterrupt  # after the summary; the parent run ends KILLED
    return SessionResult(study, parent_run_id, problems, test)


def _close_what_dead_workers_left(tracker: Tracker, storage, study_name: str) -> None:
    for number in studies.fail_dead_trials(storage, study_name):
        print(f"trial {number} was left running by a process that is gone: marked FAIL", flush=True)
    for run_id in studies.close_runs_of_finished_trials(tracker, storage, study_name):
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
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
        print(
            f"best: trial {best.number} ({params}): val_loss {best.value:.4f}, val_acc {best.user_attrs['val_acc']:.4f}"
        )
        if test:
            scores = f"test_acc {test['test_acc']:.4f}, test_loss {test['test_loss']:.4f}"
            print(f"test (the best trial's weights, evaluated once): {scores}")
    print(
        f"look at it: {tracker.ui_command()}   then {tracker.run_url(parent_run_id)}\n"
        f"the study: {public_url(storage_url)}, study {study.study_name!r}; the same command continues it"
    )
