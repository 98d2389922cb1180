"""Load-test the two servers a study on many machines shares: PostgreSQL and `mlflow server`.

Starts both on this machine in a scratch folder (as the servers test does), then, for each N of
--workers, runs a tune session of N worker processes that start trials for --seconds, on a new
study and MLflow experiment. Each trial is the tests' tiny experiment (milliseconds of training,
three epochs) through the whole machinery: ask and tell with heartbeats, an MLflow run with its
settings, data sets, a metric batch per epoch and the checkpoint. Prints, for each N, a line per
check (every trial COMPLETE, every run FINISHED with all its epochs, no store error reaching a
worker as a failure), then a markdown table: trials a second, how long the stores' calls waited
(median and 95th percentile), errors and retries, and each server's CPU; and the ceiling that the
servers' CPU per trial sets. Exits 1 if a check fails. Needs PostgreSQL (apt-get install
postgresql) and the [postgres] extra (pip install -e ".[postgres]").

    python scripts/loadtest.py
    python scripts/loadtest.py --workers 1 8 --seconds 20 --keep
"""

from __future__ import annotations

import sys

from tunetrack.machinery.cli import flags
from tunetrack.machinery.runtime import collector


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(__doc__)
    parser.add_argument(
        "--workers", type=flags.positive_int, nargs="+", default=[1, 8, 32, 128], help="(default: %(default)s)"
    )
    parser.add_argument(
        "--seconds", type=flags.positive_float, default=60, help="each N's time to start trials (default: %(default)s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder: logs, servers' data, timed calls")
    args = parser.parse_args(argv)

    from workbench import loadtest
    from workbench.servers import PostgresFailed, postgres_bin

    if postgres_bin() is None:
        flags.fail(parser.prog, "PostgreSQL is not installed: apt-get install postgresql")
    collector.freeze_imports()
    try:
        counts = list(dict.fromkeys(args.workers))
        phases = loadtest.run(counts, args.seconds, lambda line: print(line, flush=True), args.keep)
    except (PostgresFailed, RuntimeError) as error:
        flags.fail(parser.prog, str(error))
    print("\n" + loadtest.table(phases) + "\n")
    print("\n".join([*loadtest.details(phases), loadtest.ceiling(phases)]))
    return 0 if all(held for phase in phases for _, held in phase.checks) else 1


if __name__ == "__main__":
    collector.pause()  # until the imports are done (machinery.runtime.collector)
    sys.exit(main())
