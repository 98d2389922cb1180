"""tune.py: a study of an experiment, from its flags to its trials, its best model tested and
registered, and its summary."""

from __future__ import annotations

import dataclasses
import functools
import signal
import sys
import time

from tunetrack.machinery.cli import checks, flags
from tunetrack.machinery.options import TuneOptions
from tunetrack.machinery.runtime import collector, console


def main(doc: str, settings_class: type, experiment_path: str, argv: list[str] | None = None,
         started: float | None = None) -> int:  # fmt: skip
    """``started`` (a time.time()) is when the command began: --timeout counts from there."""
    started = time.time() if started is None else started
    console.forgive()  # output that goes nowhere costs lines, never the study

    def start_workers_imports(options: TuneOptions) -> None:
        """With several workers, start the server they are forked from as soon as the flags parse:
        its imports (torch, Lightning, MLflow, Optuna, the experiment) run beside this process's."""
        from tunetrack.machinery.study import fork_server

        if min(options.workers or fork_server.available_cores(), options.most_trials) > 1:
            fork_server.start([experiment_path.partition(":")[0]])

    # Every flag, store address and size is checked before any data is fetched or any store is
    # created.
    parser, settings, options = flags.parse(doc, settings_class, TuneOptions, argv, on_parsed=start_workers_imports)
    checks.check_registered_model(parser, options.registered_model)
    if options.until is not None and options.n_trials is not None:
        parser.error("argument --until: give --n-trials (trials to add) or --until (the study's total), not both")
    checks.check_accelerator(parser, options.accelerator)
    checks.check_storage(parser, options.storage)
    checks.check_tracking(parser, options.tracking_uri)

    from tunetrack.machinery.runtime import interrupts
    from tunetrack.machinery.study.parent_run import StudysStoreUnavailable
    from tunetrack.machinery.study.studies import StudyMismatch
    from tunetrack.machinery.study.tuning import tune
    from tunetrack.machinery.tracking.mlflow_runs import TrackingUnavailable, connect, http_patience
    from tunetrack.machinery.tracking.stores import DISK_FULL, ServerUnavailable, disk_full

    experiment = flags.load(experiment_path)
    collector.freeze_imports()
    options = checks.check_objective(parser, experiment, options)
    options = dataclasses.replace(options, fixed=checks.fix_searched(parser, experiment, settings))
    checks.check_network(parser, experiment, settings, options.verbose)
    options = dataclasses.replace(options, workers=checks.check_workers(parser, experiment, settings, options))
    # Here, once, before any worker starts.
    print(checks.prepare_data(parser, experiment, settings, options.verbose), flush=True)
    http_patience(options.server_patience)
    deadline = None if options.timeout is None else started + options.timeout
    try:
        outcome = tune(
            experiment,
            settings,
            options,
            functools.partial(connect, options.tracking_uri, options.experiment),
            deadline,
            began=started,  # its imports are the study's start-up too
        )
    except StudyMismatch as error:
        parser.error(f"argument {error.flag}: {error}")
    except ServerUnavailable as error:
        flags.fail(parser.prog, f"{error}; the study stopped, and what could be closed was")
    except StudysStoreUnavailable as error:  # the MLflow store the study recorded, when it continues
        flags.fail(parser.prog, f"the study's MLflow store: {error}")
    except TrackingUnavailable as error:  # the one the command names, opened once the study accepts it
        checks.tracking_unavailable(parser, options.tracking_uri, error)
    except Exception as error:  # noqa: BLE001 - a disk that filled is said in one line; anything else as ever
        if not disk_full(error):
            raise
        flags.fail(parser.prog, DISK_FULL)
    except KeyboardInterrupt:
        what = "finished trials are kept, the others and their MLflow runs are closed"
        if interrupts.requested() != signal.SIGINT and options.resume_attempts:
            what = "finished trials are kept, the others go on from their last epoch in the study's next run"
        flags.fail(parser.prog, f"{interrupts.describe()}; {what}", interrupts.exit_code())
    for problem in outcome.problems:
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
    return 1 if outcome.problems else 0
