"""Tune the experiment with Optuna, every trial tracked in MLflow.

Searches the space of src/experiment/search.py (batch size, hidden dim and learning rate; TPE
sampler, median pruning) with N worker processes; each trial runs the experiment's objective,
which trains as scripts/train.py does and logs its curves to an MLflow run nested under the
study's parent run. The study is kept in optuna.db: the same command again continues it. At
the end, the best trial's weights are tested once, logged as an MLflow model and registered
as TASK-classifier (mnist-classifier by default), whose alias @champion is always the best so
far (scripts/predict.py uses it). Then `mlflow ui`, in this folder, shows it all.

    python scripts/tune.py --n-trials 50
    python scripts/tune.py --model cnn --n-trials 20 --max-epochs 5
    python scripts/tune.py --storage postgresql://user:pw@db/optuna --tracking-uri http://mlflow:5000
"""

from __future__ import annotations

import time

STARTED = time.time()  # --timeout counts from here: start-up is part of the study's wall time

import dataclasses  # noqa: E402
import sys  # noqa: E402

from experiment.settings import Settings  # noqa: E402
from machinery import cli, collector  # noqa: E402
from machinery.options import TuneOptions  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    # Every flag, store address and size is checked before any data is fetched or any store is
    # created.
    parser, settings, options = cli.parse(__doc__, Settings, TuneOptions, argv, on_parsed=start_workers_imports)
    cli.check_registered_model(parser, options.registered_model)
    cli.check_accelerator(parser, options.accelerator)
    cli.check_storage(parser, options.storage)
    cli.check_tracking(parser, options.tracking_uri)

    from experiment.search import EXPERIMENT
    from machinery import interrupts
    from machinery.stores import ServerUnavailable
    from machinery.studies import StudyMismatch
    from machinery.tracking import http_patience
    from machinery.tuning import tune

    collector.freeze_imports()
    options = dataclasses.replace(options, workers=cli.check_workers(parser, EXPERIMENT, settings, options))
    cli.prepare_data(parser, EXPERIMENT, settings)  # here, once, before any worker starts
    http_patience(options.server_patience)
    deadline = None if options.timeout is None else STARTED + options.timeout
    try:
        session = tune(
            EXPERIMENT,
            settings,
            options,
            lambda: cli.connect_tracking(parser, options.tracking_uri, options.experiment),
            deadline,
        )
    except StudyMismatch as error:
        parser.error(f"argument {error.flag}: {error}")
    except ServerUnavailable as error:
        cli.fail(parser.prog, f"{error}; the study stopped, and what could be closed was")
    except KeyboardInterrupt:
        what = "finished trials are kept, the others and their MLflow runs are closed"
        cli.fail(parser.prog, f"{interrupts.describe()}; {what}", interrupts.exit_code())
    for problem in session.problems:
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
    return 1 if session.problems else 0


def start_workers_imports(options: TuneOptions) -> None:
    """With several workers, start the server they are forked from as soon as the flags parse:
    its imports (torch, Lightning, MLflow, Optuna, the experiment) run beside this process's."""
    from machinery import forking

    if min(options.workers or forking.available_cores(), options.n_trials) > 1:
        forking.start(["experiment.search"])


if __name__ == "__main__":
    collector.pause()  # until the imports are done (machinery.collector)
    sys.exit(main())
