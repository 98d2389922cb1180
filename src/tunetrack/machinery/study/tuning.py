"""A tune.py session: open or continue the study, run its trials in workers, and leave the
results in the Optuna storage and in MLflow."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
import torch
from optuna.trial import FrozenTrial
from tqdm import tqdm

from tunetrack.machinery.contract import Experiment
from tunetrack.machinery.data.batches import examples
from tunetrack.machinery.objectives import MEASURED, shown
from tunetrack.machinery.runtime import interrupts
from tunetrack.machinery.study import first_trials, repeats, results, studies, time_split
from tunetrack.machinery.study.baseline import Baseline, run_baselines
from tunetrack.machinery.study.retraining import train_again
from tunetrack.machinery.study.storage import open_storage
from tunetrack.machinery.study.studies import RUN_ATTR, SETTINGS_ATTR, STUDY_UID_TAG, TRIAL_TAG
from tunetrack.machinery.study.trial import Session, TrialReport, close_run
from tunetrack.machinery.study.workers import quiet_libraries, run_workers
from tunetrack.machinery.tracking import registry
from tunetrack.machinery.tracking.mlflow_runs import Tracker, connect, default_tracking_uri
from tunetrack.machinery.tracking.stores import public, sqlite_path


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
        store = _the_studys_own_store(study, options, wait=not created)
        tracker = connect(store, options.experiment) if store else open_tracker()
        uid = studies.uid(study)
        _close_what_dead_workers_left(tracker, storage, name, uid, options)
        to_add = _to_add(options, storage)
        print(_first_line(study, options, to_add), flush=True)
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
        parent_run_id = _parent_run(tracker, study, uid, created, params, notes)
        where = (tracker.tracking_uri, tracker.experiment_id, uid, parent_run_id)
        session = Session(experiment, settings, options, *where, deadline, clock.session)
        bar = tqdm(total=to_add, desc="study", unit="trial", dynamic_ncols=True)

        def report(trial: TrialReport) -> None:
            bar.write(trial.line(options.goal.names))
            bar.update()

        problems, tested, registered, end = [], None, None, _Ending(notes=notes)
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
                    end.repeated, seconds = repeats.repeat_best(study, candidates, count, experiment, options, tracker,
                                                                parent_run_id)  # fmt: skip
                end.best = end.repeated[0].trial if end.repeated else end.best
                end.repeats_said = _repeats_said(end.repeated, count, seconds, study, options)
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
                judge = results.judge_on(experiment, tested.datamodule, options.accelerator, tracker)
                chosen = next((r for r in end.repeated if r.trial.number == tested.trial.number), None)
                with clock.timing("registration"):
                    registered = _register(tracker, study.study_name, uid, tested, options, judge, chosen)
                notes.append(registered.line())
            notes += _still_running_elsewhere(study, grace)
            end.test = tested.metrics if tested else None
            split = clock.split(tracker, options.workers)
            clock.log(tracker, parent_run_id, split)
            end.time = time_split.line(split, options.workers)
            _print_summary(study, tracker, parent_run_id, options, end)
            if interrupts.requested():  # during the trials, or while the best was tested and logged
                raise KeyboardInterrupt  # after the summary; the parent run ends KILLED
            if problems:
                raise _EndedOnAnError("; ".join(problems))  # the parent run ends FAILED, and says why
    return TuneOutcome(study, parent_run_id, problems, end.test, notes, tested and tested.model_id, registered,
                       end.repeated, end.baselines)  # fmt: skip


@dataclass
class _Ending:
    """What a session found after its trials, for its summary."""

    notes: list[str]
    best: FrozenTrial | None = None  # the trial it tests and registers
    repeated: list[repeats.Repeated] = field(default_factory=list)
    repeats_said: list[str] = field(default_factory=list)
    baselines: list[Baseline] = field(default_factory=list)
    test: dict[str, float] | None = None
    time: str = ""  # where the session's time went (time_split)


def _to_add(options, storage) -> int:
    """The trials this session adds: --n-trials, or what --until's total leaves."""
    if options.until is None:
        return options.most_trials
    return min(options.most_trials, max(0, options.until - studies.toward_total(storage, options.study_name)))


def _first_line(study: optuna.Study, options, to_add: int) -> str:
    where = f"{public(options.storage)}, study {study.study_name!r}"
    total = f", to a total of {options.until} (--until)" if options.until is not None else ""
    if not study.trials:
        return f"new study in {where}: adding {to_add} trials{total}"
    counted = sum(t.state in studies.TOWARD_TOTAL for t in study.get_trials(deepcopy=False))
    return (f"continuing {where}: {len(study.trials)} trials so far, {counted} of them complete, pruned or under way; "
            f"adding {to_add}{total}")  # fmt: skip


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


def _repeats_said(repeated: list[repeats.Repeated], count: int, seconds: float, study, options) -> list[str]:
    if not repeated:
        return ["repeats stopped before the first trial had all of its runs"]
    trials = sum(t.duration.total_seconds() for t in study.trials if t.duration)
    metric = options.goal.first
    lines = [
        f"repeats: the best {len(repeated)} trials trained {count} more times each, with new seeds (and validation "
        f"splits, where the data has no validation folder): {seconds:.1f} s; the trials took {trials:.1f} s, added up"
    ]
    lines += [f"  {r.line(metric)}" for r in repeated]
    return lines


def _the_studys_own_store(study: optuna.Study, options, wait: bool) -> str | None:
    """The MLflow store that a continued study keeps its runs in, where the command named none and
    MLflow's default here is another (it was run from another folder): the study's, if it is a
    file that is there; else None, for the store the command would use. A store named by
    --tracking-uri or MLFLOW_TRACKING_URI is the one used."""
    if options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    recorded = studies.recorded_parent_runs(study, wait=wait)
    if not recorded or public(default_tracking_uri()) in recorded:
        return None
    theirs = [uri for uri in recorded if (path := sqlite_path(uri)) is not None and path.is_file()]
    if theirs:
        print(f"study {study.study_name!r} keeps its MLflow runs in {theirs[0]}: so does this session "
              "(--tracking-uri chooses another store)", flush=True)  # fmt: skip
    return theirs[0] if theirs else None


def _register(tracker: Tracker, study_name: str, uid: str, tested: results.Tested, options, judge, repeated):
    """Register the tested best trial's model, with what it is on the version (the trial's run:
    its checkpoint, for a later study validated on other data to measure it by) and its score
    under the study's objective (the mean of its runs and their standard error, where it was
    trained again)."""
    trial = tested.trial
    facts = {"study": study_name, "study_uid": uid, "trial": trial.number, "run_id": trial.user_attrs[RUN_ATTR]}
    metric, direction = options.goal.first, options.goal.directions[0]
    score = repeated.score(metric, direction) if repeated else registry.Score(metric, direction, trial.values[0])
    metrics = studies.metrics_of(trial)
    tags = registry.version_tags(trial.user_attrs[SETTINGS_ATTR], tested.data, **facts, **metrics, **tested.metrics)
    return registry.register(tracker, tested.model_id, options.registered_model, tags, score,
                             same=("study_uid", "trial"), validated_on="validation_data", judge=judge)  # fmt: skip


def _parent_run(tracker: Tracker, study: optuna.Study, uid: str, created: bool, params: dict, notes: list[str]) -> str:
    """The study's MLflow parent run in this tracking store: created with the study, reopened
    when the study continues, and created anew (saying so) when the store lost it.

    Only the process that created the study creates its run; one that found the study just
    created waits for that run. Where a run must be made later (a store that lost it, or
    another store), two processes starting at the same moment agree on one run
    (studies.record_parent_run), and the other drops its own.
    """
    store, name = public(tracker.tracking_uri), study.study_name
    recorded = studies.recorded_parent_runs(study, wait=not created)
    # This store's run first; then the others', as one server reached by two addresses (a
    # machine behind a gateway, say) is one store, and run ids are unique across stores.
    for run_id in sorted(recorded.values(), key=lambda run_id: run_id != recorded.get(store)):
        if tracker.reopen(run_id):
            return run_id
    if store in recorded:
        notes.append(
            f"the MLflow store {store} has no run of study {name!r} (its parent run {recorded[store]} is gone): a "
            "new parent run starts there; earlier trials keep their Optuna records, not their curves"
        )
        print(notes[-1], flush=True)
    older = [
        run
        for run in tracker.runs_tagged("optuna.study", name)
        if "mlflow.parentRunId" not in run.data.tags and run.data.tags.get(STUDY_UID_TAG) != uid
    ]
    if older:
        notes.append(
            f"a new study {name!r} began beside {len(older)} older one(s) of the same name in this MLflow "
            f"experiment: its runs are named '{name} ({uid[:8]})' and carry the tag {STUDY_UID_TAG}={uid}"
        )
        print(notes[-1], flush=True)
    run_id = tracker.create_run(
        f"{name} ({uid[:8]})" if older else name, tags={"optuna.study": name, STUDY_UID_TAG: uid}
    )
    tracker.log_params(run_id, params)
    # The creator is the only writer (a study is created once): it needs no time to settle.
    winner = studies.record_parent_run(study, store, run_id, recorded.get(store), settle=0 if created else 1)
    if winner != run_id:
        tracker.delete_run(run_id)
        tracker.reopen(winner)
    return winner


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


def _still_running_elsewhere(study: optuna.Study, grace: int) -> list[str]:
    """The study's trials that other processes still run, as this one stops."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return [
        f"trial {trial.number} still runs on {owner.get('host', '?')} (pid {owner.get('pid', '?')}): it ends there, "
        f"or, if its heartbeat stops for {grace} s, the next process to start a trial of this study hands it back "
        "to the study, to go on from its last epoch (or marks it FAIL: --resume-attempts)"
        for trial in running
        for owner in [trial.user_attrs.get(studies.WORKER_ATTR, {})]
    ]


def _print_summary(study, tracker, parent_run_id, options, end: _Ending) -> None:
    counts = results.counts(study)
    print(
        f"\nstudy {study.study_name!r}: {len(study.trials)} trials, {counts['COMPLETE']} complete, "
        f"{counts['PRUNED']} pruned, {counts['FAIL']} failed"
        + (f", {counts['RUNNING']} running" if counts["RUNNING"] else "")
        + (f", {counts['WAITING']} cut short, to resume" if counts["WAITING"] else "")
    )
    objective, best = options.goal, end.best
    if best is None:
        print("no trial has completed yet")
    else:
        if objective.several:
            front = results.pareto_front(study)
            print(f"Pareto front of {objective}: the {len(front)} trials that no other beats on both, best first on "
                  f"{objective.first}")  # fmt: skip
        print(results.top_trials_table(study, n=len(results.pareto_front(study)) if objective.several else 5))
        for line in end.repeats_said:
            print(line)
        seed = best.user_attrs.get(SETTINGS_ATTR, {}).get("seed")
        chosen = "the front's best on the first objective; " if objective.several else ""
        chosen = "the best by the mean of its runs; " if end.repeated else chosen
        metrics = studies.metrics_of(best)
        scores = {name: value for name, value in metrics.items() if name in objective.names or name not in MEASURED}
        print(f"best: trial {best.number} ({chosen}{results.describe_params(best, exact=True)}; seed {seed}): "
              f"{shown(scores, objective.names, ', ')}")  # fmt: skip
        if end.test:
            tested = shown(end.test, _test_names(_names(objective, best)), ", ")
            print(f"test (the best trial's weights, evaluated once): {tested}")
    for baseline in end.baselines:
        print(baseline.line(_names(objective, best)))
    for note in end.notes:
        print(note)
    print(end.time)
    if best is not None:
        print(f"train it again: {train_again(study.study_name, best.number, options.storage)}")
    again = "the same command continues it"
    if options.until is not None:
        again = f"the same command adds what its {options.until} lack; a larger --until, or --n-trials N, adds more"
    print(
        f"look at it: {tracker.ui_command()}   then {tracker.run_url(parent_run_id)}\n"
        f"the study: {public(options.storage)}, study {study.study_name!r}; {again}"
    )


def _names(objective, best) -> list[str]:
    """The metrics a baseline's line shows: those the best trial's line shows."""
    logged = studies.metrics_of(best) if best is not None else {}
    return [*objective.names, *(name for name in logged if name not in objective.names and name not in MEASURED)]


def _test_names(names) -> list[str]:
    """The test metrics that go with validation ones: test_acc for val_acc."""
    return [name.replace("val_", "test_", 1) for name in names if name.startswith("val_")]
