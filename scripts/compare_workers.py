"""Compare ways of splitting a machine's cores into tune.py's workers, on the real MNIST.

For every core count this machine can emulate (1, 2, 4, ... of its cores, by CPU affinity) and,
on each, 1, 2, 4, ... workers up to one per core, runs a study of the default search for
--budget seconds of wall-clock time, for every seed, seed by seed in rotated orders. Prints, per
configuration, the median over the seeds of the trials a minute, of when the first complete
trial landed, and of the best val_loss found by 30 s, 60 s, 120 s and the budget: the table of
docs/performance.md that tune.py's default worker count follows.

    python scripts/compare_workers.py --seeds 2 --budget 120
"""

from __future__ import annotations

import sys
import time

from tunetrack.machinery.cli import checks, flags


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(__doc__)
    parser.add_argument("--seeds", type=flags.positive_int, default=2, help="seeds each (default: %(default)s)")
    parser.add_argument(
        "--budget", type=flags.positive_float, default=120, help="seconds a study (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    from tunetrack.experiment.search import EXPERIMENT
    from tunetrack.experiment.settings import Settings
    from tunetrack.machinery.study.fork_server import available_cores
    from workbench.worker_comparison import compare, configurations, summarize, table_markdown

    checks.prepare_data(parser, EXPERIMENT, Settings())
    cores = available_cores()
    print(f"{len(configurations(cores))} configurations x {args.seeds} seeds x {args.budget:.0f} s", flush=True)

    def done(study: dict) -> None:
        complete = sum(t["state"] == "COMPLETE" for t in study["trials"])
        print(f"{time.strftime('%H:%M:%S')} seed {study['seed']} {study['cores']} cores, {study['workers']} workers: "
              f"{len(study['trials'])} trials, {complete} complete", flush=True)  # fmt: skip

    print(table_markdown(summarize(compare(range(args.seeds), args.budget, cores, done))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
