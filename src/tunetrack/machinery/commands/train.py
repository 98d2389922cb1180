"""train.py: one run of an experiment, from its flags to a finished MLflow run and a logged
model (registered, with --register); a trial's or a run's settings again with --from-trial and
--from-run."""

from __future__ import annotations

import dataclasses

from tunetrack.machinery.cli import checks, flags
from tunetrack.machinery.options import TrainOptions
from tunetrack.machinery.runtime import collector, console


def main(doc: str, settings_class: type, experiment_path: str, argv: list[str] | None = None) -> int:
    # Every flag, store address and size is checked before any data is fetched or any store or
    # run is created.
    console.forgive()  # output that goes nowhere costs lines, never the run
    found = []  # the trial or run that --from-trial or --from-run names, once read

    def recorded(parser, options: TrainOptions) -> dict:
        found.extend(filter(None, [recorded_settings(parser, options, settings_class)]))
        return found[0].settings if found else {}

    parser, settings, options = flags.parse(doc, settings_class, TrainOptions, argv, recorded=recorded)
    checks.check_registered_model(parser, options.registered_model)
    checks.check_accelerator(parser, options.accelerator)
    checks.check_tracking(parser, options.tracking_uri)

    import torch

    from tunetrack.machinery.contract import SettingError
    from tunetrack.machinery.objectives import MEASURED, shown
    from tunetrack.machinery.runtime import interrupts
    from tunetrack.machinery.study import results
    from tunetrack.machinery.study.space import format_value
    from tunetrack.machinery.tracking import registry
    from tunetrack.machinery.tracking.stores import DISK_FULL, disk_full, public
    from tunetrack.machinery.training.fit import TrackedRun, TrainingDiverged, lightnings_exit_as_interrupt

    experiment = flags.load(experiment_path)
    collector.freeze_imports()
    if found and options.objective is None and found[0].objective:  # a trial's study's, where no flag names one
        options = dataclasses.replace(options, objective=found[0].objective, direction=found[0].direction)
    options = checks.check_objective(parser, experiment, options)
    checks.check_network(parser, experiment, settings, options.verbose)
    checks.check_memory(parser, experiment, settings, options.verbose)
    data_line = checks.prepare_data(parser, experiment, settings, options.verbose)
    tracker = checks.connect_tracking(parser, options.tracking_uri, options.experiment)
    if found:
        what = f"trial {options.from_trial}" if options.from_trial else f"run {options.from_run}"
        again = ", ".join(f"{k}={format_value(v, exact=True)}" for k, v in dataclasses.asdict(settings).items())
        threads = ""
        if found[0].threads:  # the same sums in the same order: on a CPU, the same metrics
            torch.set_num_threads(found[0].threads)
            threads = f", with {found[0].threads} thread(s) as it had"
        print(f"training {what} again, as recorded and as the flags change it{threads}: {again}", flush=True)
    print(data_line, flush=True)
    searched = experiment.search_space(settings)
    run_name = " ".join([settings.study, *(f"{name}={format_value(getattr(settings, name))}" for name in searched)])
    registered = None
    try:
        with interrupts.handling():
            with tracker.run(run_name) as run_id:
                with interrupts.interruptible(), lightnings_exit_as_interrupt():
                    model, data = experiment.build(settings)
                    run = TrackedRun(tracker, run_id, options, experiment.trainer)
                    trainer = run.trainer(settings)
                    trainer.fit(model, datamodule=data)
                    run.test(model, data)
                result = run.result
                model_id = registry.log_model(tracker, run_id, result.model, data, settings.task, experiment.datasets)
            if options.register:
                facts = {"run_id": run_id, **result.metrics, **result.test}
                tags = registry.version_tags(dataclasses.asdict(settings), data.describe(), **facts)
                goal = options.goal
                score = registry.Score(goal.first, goal.directions[0], result.metrics[goal.first])
                candidate = registry.Candidate(
                    model_id, tags, score, same=("run_id",), validated_on=results.VALIDATED_ON
                )
                registered = results.register(candidate, data, experiment, options, tracker)
    except SettingError as error:
        checks.setting_error(parser, settings, error)
    except TrainingDiverged as error:
        flags.fail(parser.prog, str(error))
    except KeyboardInterrupt:
        flags.fail(parser.prog, f"{interrupts.describe()}; the MLflow run is marked KILLED", interrupts.exit_code())
    except Exception as error:  # noqa: BLE001 - a disk that filled is said in one line; anything else as ever
        if not disk_full(error):
            raise
        flags.fail(parser.prog, DISK_FULL)
    if interrupts.requested():  # while the model was logged: the run is complete, and says so
        flags.fail(parser.prog, f"{interrupts.describe()} after the run was complete", interrupts.exit_code())

    readable = getattr(data, "picture", None) is not None  # predict.py can prepare pictures for it
    goal = options.goal
    scores = {name: value for name, value in result.metrics.items() if name in goal.names or name not in MEASURED}
    tests = [name.replace("val_", "test_", 1) for name in scores]
    lines = [
        f"\nbest epoch {result.best_epoch + 1} by {goal.per_epoch[0]}: {shown(scores, goal.names, ', ')}; "
        f"{shown(result.test, tests, ', ')} in {result.seconds:.1f} s",
        result.stopped_early,
        f"MLflow run {result.run_id} in experiment {options.experiment!r} of {public(tracker.tracking_uri)}",
        f"the model: models:/{model_id}"
        + (f" (python scripts/predict.py --model models:/{model_id} picture.png)" if readable else ""),
        registered and registered.line(),
        f"look at it: {tracker.ui_command()}   then {tracker.run_url(result.run_id)}",
    ]
    print("\n".join(line for line in lines if line))
    return 0


def recorded_settings(parser, options: TrainOptions, settings_class: type):
    """What the trial or run that --from-trial or --from-run names recorded, if one does."""
    from tunetrack.machinery.study import retraining

    if options.from_trial and options.from_run:
        parser.error("argument --from-run: give --from-trial or --from-run, not both")
    try:
        if options.from_trial:
            return retraining.from_trial(options.storage, options.from_trial)
        if options.from_run:
            tracking_uri = checks.check_tracking(parser, options.tracking_uri, read_only=True)
            return retraining.from_run(tracking_uri, options.from_run, settings_class)
    except retraining.NotRecorded as error:
        parser.error(f"argument {error.flag}: {error}")
    return None
