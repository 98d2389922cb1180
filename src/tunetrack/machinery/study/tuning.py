"""A tune.py session: open or continue the study, run its trials in workers, and leave the
results in the Optuna storage and in MLflow."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
import torch
from tqdm import tqdm

from tunetrack.machinery.contract import Experiment
from tunetrack.machinery.data.batches import examples
from tunetrack.machinery.runtime import interrupts
from tunetrack.machinery.study import first_trials, parent_run, repeats, results, studies, summary, time_split
from tunetrack.machinery.study.baseline import Baseline, run_baselines
from tunetrack.machinery.study.kept_state import close_run
from tunetrack.machinery.study.storage import open_storage
from tunetrack.machinery.study.studies import STUDY_UID_TAG, TRIAL_TAG
from tunetrack.machinery.study.summary import TrialReport
from tunetrack.machinery.study.trial import Session
from tunetrack.machinery.study.workers import quiet_libraries, run_workers
from tunetrack.machinery.tracking import registry
from tunetrack.machinery.tracking.mlflow_runs import Tracker
from tunetrack.machinery.tracking.stores import public


class _EndedOnAnError(Exception):
    """The study stopped on an error: its parent run ends FAILED, and the session returns."""


@dataclass(frozen=True)
class TuneOutcome:
    study: optuna.Study
    parent_run_id: str
    problems: list[str]
    test: dict[str, float] | None
    notes: list[str] = field(default_factory=list)  # what the summary said beyond the trials
    model_id: str | None = None  # the tested best trial's network, logged on the parent run
    registered: registry.Registered | None = None
    repeated: list[repeats.Repeated] = field(default_factory=list)  # the best trials, trained again: best first
    baselines: list[Baseline] = field(default_factory=list)


def tune(
    experiment: Experiment,
    settings,
    options,
    open_tracker: Callable[[], Tracker],
    deadline: float | None = None,
    began: float | None = None,
) -> TuneOutcome:
    """Run ``options.n_trials`` more trials of the study ``options.study_name`` (created on first
    use) in ``options.workers`` processes, tracked in the MLflow store that ``open_tracker()``
    opens once the study is known to accept them.

    ``settings`` say how each trial trains; the experiment's objective sets the searched ones.
    No trial starts after ``deadline`` (a time.time()) but each worker's first. The tested best
    trial's network is registered as ``options.registered_model``, the alias champion moving
    to it if it is the best. A continuation whose definition differs from the study's raises
    StudyMismatch before anything changes. The first Ctrl-C stops the trials; the clean-up and
    the summary still run, and then KeyboardInterrupt is raised.
    """
    quiet_libraries(options.verbose)
    options = options.aimed(experiment)
    if options.goal.several and options.pruning:
        print("pruning is off: Optuna prunes no study of two objectives", flush=True)
        options = dataclasses.replace(options, pruning=False)
    clock = time_split.StudyClock(began)  # its start-up counted from ``began`` (time.time()), or from here
    with torch.device("meta"):  # the data module's fingerprint: a study refuses other data
        _, data = experiment.build(settings)
    name, grace = options.study_name, options.grace_period
    with interrupts.handling():
        storage = open_storage(options.storage, grace, patience=options.server_patience)
        space = experiment.search_space(settings)
        wanted = studies.definition(settings, space, options, data.fingerprint)
        first = first_trials.first_points(settings, space, options, storage)
        wanted["first_trials"] = first  # recorded with a new study; a continuation is not compared by it
        study, created = studies.open_study(storage, name, wanted)
        # Only now: a continuation that is refused creates no store or experiment.
        store = parent_run.own_store(study, options, wait=not created)
        tracker = parent_run.connect_own_store(store, options.experiment) if store else open_tracker()
        uid = studies.uid(study)
        _close_what_dead_workers_left(tracker, storage, name, uid, options)
        to_add = _to_add(options, storage)
        print(summary.first_line(study, options, to_add), flush=True)
        if created and first:
            first_trials.enqueue(study, first)
            print(first_trials.said(first), flush=True)
        if options.fixed:
            searched = [name for name in wanted["space"] if name not in options.fixed]
            fixed = ", ".join(f"{name}={getattr(settings, name)}" for name in options.fixed)
            print(f"searching {', '.join(searched) or 'nothing'}; fixed by the command line: {fixed}", flush=True)
        notes: list[str] = []
        params = {
            "study_name": name,
            "storage": public(options.storage),
            "objective": str(options.goal),
            **wanted["search"],
            **dataclasses.asdict(settings),
        }
        parent_run_id = parent_run.open_run(tracker, study, uid, created, params, notes)
        where = (tracker.tracking_uri, tracker.experiment_id, uid, parent_run_id)
        session = Session(experiment, settings, options, *where, deadline, clock.session)
        bar = tqdm(total=to_add, desc="study", unit="trial", dynamic_ncols=True)

        def report(trial: TrialReport) -> None:
            bar.write(trial.line(options.goal.names))
            bar.update()

        problems, tested, registered, end = [], None, None, summary.Ending(notes=notes)
        with contextlib.suppress(_EndedOnAnError), tracker.closing(parent_run_id):
            try:
                with clock.timing("trials"):
                    problems = run_workers(session, to_add, options.workers, report) if to_add else []
            finally:
                bar.close()
            _close_what_dead_workers_left(tracker, storage, name, uid, options)
            finished = not interrupts.requested() and not problems
            end.best = results.best_trial(study)
            real = functools.cache(lambda: experiment.build(settings)[1])  # the study's data, to count and learn from
            count = _repeats(options, real) if finished and end.best is not None else 0
            if count:
                candidates = results.complete_trials(study)[: options.repeat_best]
                with clock.timing("repeats"):
                    end.repeated, seconds = repeats.repeat_best(study, candidates, count, session, tracker)
                end.best = end.repeated[0].trial if end.repeated else end.best
                end.repeats_said = summary.repeats_said(end.repeated, count, seconds, study, options)
            with clock.timing("summary"):
                results.log_study_summary(study, tracker, parent_run_id, end.best)
            if finished and not interrupts.requested() and options.baseline != "none":
                kinds = ["linear", "svc"] if options.baseline == "svc" else ["linear"]
                tags = {"optuna.study": name, STUDY_UID_TAG: uid}
                with clock.timing("baseline"):
                    end.baselines, left_out = run_baselines(kinds, real(), tracker, parent_run_id, tags)
                notes += left_out
            if finished and not interrupts.requested():
                try:
                    with clock.timing("test"):
                        tested = results.evaluate_best_trial(study, tracker, parent_run_id, experiment, options,
                                                             end.best)  # fmt: skip
                except results.NotEvaluated as why:
                    notes.append(f"test evaluation skipped: {why}")
            if tested and options.registered_model and not interrupts.requested():
                chosen = next((r for r in end.repeated if r.trial.number == tested.trial.number), None)
                with clock.timing("registration"):
                    candidate = results.tested_candidate(tested, uid, options, chosen)
                    registered = results.register(candidate, tested.datamodule, experiment, options, tracker)
                notes.append(registered.line())
            notes += summary.still_running_elsewhere(study, grace)
            end.test = tested.metrics if tested else None
            split = clock.split(tracker, options.workers)
            clock.log(tracker, parent_run_id, split)
            end.time = time_split.line(split, options.workers)
            summary.print_summary(study, tracker, parent_run_id, options, end)
            if interrupts.requested():  # during the trials, or while the best was tested and logged
                raise KeyboardInterrupt  # after the summary; the parent run ends KILLED
            if problems:
                raise _EndedOnAnError("; ".join(problems))  # the parent run ends FAILED, and says why
    return TuneOutcome(study, parent_run_id, problems, end.test, notes, tested and tested.model_id, registered,
                       end.repeated, end.baselines)  # fmt: skip


def _to_add(options, storage) -> int:
    """The trials this session adds: --n-trials, or what --until's total leaves."""
    if options.until is None:
        return options.most_trials
    return min(options.most_trials, max(0, options.until - studies.toward_total(storage, options.study_name)))


def _repeats(options, real: Callable) -> int:
    """How many times each of the best trials trains again: --repeats, or by default as many as
    are cheap on data of this size (``real()``: the study's; none for a study of two objectives)."""
    if options.goal.several:
        return 0
    if options.repeats is not None:
        return options.repeats
    data = real()
    data.prepare_data()
    data.setup("fit")
    return repeats.default_repeats(examples(data.train_dataloader()))


def _close_what_dead_workers_left(tracker: Tracker, storage, study_name: str, uid: str, options) -> None:
    for trial in studies.take_back_dead_trials(storage, study_name, options.grace_period, options.resume_attempts):
        what = studies.resumes_from(trial) if trial.state == optuna.trial.TrialState.WAITING else "marked FAIL"
        print(f"trial {trial.number} was left running by a process that is gone: {what}", flush=True)
        close_run(tracker, trial)
    # A run can outlive its trial's record of it: killed between creating the run and naming
    # it on the trial, say. Its tags still say which trial it belongs to.
    finished = {trial.number: trial for trial in studies.finished_trials(storage, study_name)}
    for run in tracker.runs_tagged(STUDY_UID_TAG, uid, running=True):
        number = run.data.tags.get(TRIAL_TAG)
        if number is not None and int(number) in finished:
            close_run(tracker, finished[int(number)], run.info.run_id)
            print(f"MLflow run {run.info.run_id} of a finished trial was still RUNNING: marked KILLED", flush=True)
