"""tune.py: a study of an experiment, from its flags to its trials, its best model tested and
registered, and its summary."""

from __future__ import annotations

import dataclasses
import signal
import sys
import time

from machinery import cli, collector, console
from machinery.options import TuneOptions


def main(doc: str, settings_class: type, experiment_path: str, argv: list[str] | None = None,
         started: float | None = None) -> int:  # fmt: skip
    """``started`` (a time.time()) is when the command began: --timeout counts from there."""
    started = time.time() if started is None else started
    console.forgive()  # output that goes nowhere costs lines, never the study

    def start_workers_imports(options: TuneOptions) -> None:
        """With several workers, start the server they are forked from as soon as the flags parse:
        its imports (torch, Lightning, MLflow, Optuna, the experiment) run beside this process's."""
        from machinery import forking

        if min(options.workers or forking.available_cores(), options.n_trials) > 1:
            forking.start([experiment_path.partition(":")[0]])

    # Every flag, store address and size is checked before any data is fetched or any store is
    # created.
    parser, settings, options = cli.parse(doc, settings_class, TuneOptions, argv, on_parsed=start_workers_imports)
    cli.check_registered_model(parser, options.registered_model)
    cli.check_accelerator(parser, options.accelerator)
    cli.check_storage(parser, options.storage)
    cli.check_tracking(parser, options.tracking_uri)

    from machinery import interrupts
    from machinery.stores import DISK_FULL, ServerUnavailable, disk_full
    from machinery.studies import StudyMismatch
    from machinery.tracking import TrackingUnavailable, http_patience
    from machinery.tuning import tune

    experiment = cli.load(experiment_path)
    collector.freeze_imports()
    options = dataclasses.replace(options, fixed=cli.fix_searched(parser, experiment, settings))
    options = dataclasses.replace(options, workers=cli.check_workers(parser, experiment, settings, options))
    cli.prepare_data(parser, experiment, settings, options.verbose)  # here, once, before any worker starts
    http_patience(options.server_patience)
    deadline = None if options.timeout is None else started + options.timeout
    try:
        session = tune(
            experiment,
            settings,
            options,
            lambda: cli.connect_tracking(parser, options.tracking_uri, options.experiment),
            deadline,
        )
    except StudyMismatch as error:
        parser.error(f"argument {error.flag}: {error}")
    except ServerUnavailable as error:
        cli.fail(parser.prog, f"{error}; the study stopped, and what could be closed was")
    except TrackingUnavailable as error:  # the MLflow store the study recorded, when it continues
        cli.fail(parser.prog, f"the study's MLflow store: {error}")
    except Exception as error:  # noqa: BLE001 - a disk that filled is said in one line; anything else as ever
        if not disk_full(error):
            raise
        cli.fail(parser.prog, DISK_FULL)
    except KeyboardInterrupt:
        what = "finished trials are kept, the others and their MLflow runs are closed"
        if interrupts.requested() != signal.SIGINT and options.resume_attempts:
            what = "finished trials are kept, the others go on from their last epoch in the study's next run"
        cli.fail(parser.prog, f"{interrupts.describe()}; {what}", interrupts.exit_code())
    for problem in session.problems:
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
    return 1 if session.problems else 0
