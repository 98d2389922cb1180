"""Tune the MNIST classifier with Optuna, every trial tracked in MLflow.

Searches the space of src/mnist_hpo/search.py (batch size, hidden dim and learning rate; TPE
sampler, median pruning) with N worker processes; each trial trains with the same function as
scripts/train.py and logs its curves to an MLflow run nested under the study's parent run. The
study is kept in optuna.db: the same command again continues it. At the end, the best trial's
weights are tested once, logged as an MLflow model and registered as mnist-classifier, whose
alias @champion is always the best so far (scripts/predict.py uses it). Then `mlflow ui`, in
this folder, shows it all.

    python scripts/tune.py --n-trials 50
    python scripts/tune.py --n-trials 20 --study-name wide --max-epochs 5
    python scripts/tune.py --storage postgresql://user:pw@db/optuna --tracking-uri http://mlflow:5000
"""

from __future__ import annotations

import time

STARTED = time.time()  # --timeout counts from here: start-up is part of the study's wall time

import dataclasses  # noqa: E402
import sys  # noqa: E402

from mnist_hpo import cli  # noqa: E402
from mnist_hpo.config import TrainConfig  # noqa: E402
from mnist_hpo.registry import DEFAULT_NAME  # noqa: E402
from mnist_hpo.search import SEARCH_SPACE  # noqa: E402
from mnist_hpo.studies import DEFAULT_STORAGE, GRACE_SECONDS, PATIENCE_SECONDS  # noqa: E402

# The settings of TrainConfig that the search does not choose: how every trial trains.
SETTINGS = [field.name for field in dataclasses.fields(TrainConfig) if field.name not in SEARCH_SPACE]


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(__doc__)
    parser.add_argument(
        "--n-trials", type=cli.positive_int, default=50, help="trials to add to the study (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=cli.positive_float,
        default=None,
        help="the study's wall time in seconds, counted from the command's start: no trial starts after it but "
        "each worker's first, and the running ones finish",
    )
    parser.add_argument(
        "--study-name", default="mnist", help="Optuna study to create or continue (default: %(default)s)"
    )
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL (default: %(default)s)")
    parser.add_argument(
        "--workers",
        type=cli.positive_int,
        default=None,
        help="worker processes (default: one per core, at most 8, and no more than fit in memory)",
    )
    parser.add_argument("--no-pruning", action="store_true", help="train every trial for all its epochs")
    parser.add_argument("--verbose", action="store_true", help="show Lightning's progress bars inside trials")
    parser.add_argument("--experiment", default="mnist-tune", help="MLflow experiment (default: %(default)s)")
    parser.add_argument(
        "--registered-model",
        default=DEFAULT_NAME,
        help="the Model Registry's model the tested best trial is registered as; its alias champion moves to "
        "it when it is better than the champion (default: %(default)s)",
    )
    parser.add_argument(
        "--grace-period",
        type=cli.positive_int,
        default=GRACE_SECONDS,
        help="seconds a running trial may go without a heartbeat before it counts as dead, its machine "
        "gone, and the next process to start a trial marks it FAIL (default: %(default)s)",
    )
    parser.add_argument(
        "--server-patience",
        type=cli.positive_float,
        default=PATIENCE_SECONDS,
        help="seconds to keep retrying a database or tracking server that does not answer, before the study "
        "stops (default: %(default)s)",
    )
    cli.add_config_flags(parser, SETTINGS)
    cli.add_common_flags(parser)
    args = parser.parse_args(argv)
    if not args.study_name.strip():
        parser.error("argument --study-name: the name is empty")
    if not args.registered_model.strip() or set("'\"") & set(args.registered_model):
        parser.error("argument --registered-model: give a name without quotes")
    base = TrainConfig(**cli.config_from_flags(args, SETTINGS))
    # Everything that can be checked is, before MNIST is fetched or any store is created.
    cli.check_data_dir(parser, args.data_dir)
    cli.check_accelerator(parser, args.accelerator)
    cli.check_storage(parser, args.storage)
    cli.check_tracking(parser, args.tracking_uri, args.experiment)
    workers = cli.check_workers(parser, args.workers, args.n_trials, base)

    from mnist_hpo.data import ensure_mnist_once
    from mnist_hpo.mnist_files import MNISTUnavailable
    from mnist_hpo.stores import ServerUnavailable
    from mnist_hpo.studies import StudyMismatch
    from mnist_hpo.tracking import http_patience
    from mnist_hpo.tuning import tune

    try:
        source = ensure_mnist_once(args.data_dir)  # here, once, before any worker starts
    except MNISTUnavailable as error:
        cli.fail(parser.prog, str(error))
    http_patience(args.server_patience)
    tracker = cli.connect_tracking(parser, args.tracking_uri, args.experiment)
    try:
        session = tune(
            tracker,
            args.storage,
            args.study_name,
            args.n_trials,
            workers,
            base=base,
            deadline=None if args.timeout is None else STARTED + args.timeout,
            data_dir=args.data_dir,
            data_source=source,
            pruning=not args.no_pruning,
            accelerator=args.accelerator,
            verbose=args.verbose,
            grace=args.grace_period,
            patience=args.server_patience,
            registered_model=args.registered_model,
        )
    except StudyMismatch as error:
        parser.error(f"argument {error.flag}: {error}")
    except ServerUnavailable as error:
        cli.fail(parser.prog, f"{error}; the study stopped, and what could be closed was")
    except KeyboardInterrupt:
        cli.fail(parser.prog, "interrupted; finished trials are kept, the others and their MLflow runs are closed", 130)
    for problem in session.problems:
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
    return 1 if session.problems else 0


if __name__ == "__main__":
    sys.exit(main())
