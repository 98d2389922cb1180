"""Measure what trying the experiment's defaults first does to a study, on the real MNIST.

For every seed, two studies of `make tune`'s search (TPE, median pruning, its workers) for
--budget seconds each, one whose first trial is the sampler's random point and one whose first
trial is the experiment's defaults (tune.py's default; --no-defaults-first turns it off), in
alternating order, seed by seed. Prints, for each, when its first complete trial landed and the
best val_loss found by each of --moments seconds: the median over the seeds, lowest to highest
in brackets (the table of docs/search.md that the default follows).

    python scripts/compare_first_trial.py --seeds 3 --budget 240
"""

from __future__ import annotations

import statistics
import sys
import time

from tunetrack.experiment.settings import Settings
from tunetrack.machinery.cli import checks, flags


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(__doc__)
    parser.add_argument("--seeds", type=flags.positive_int, default=3, help="seeds each (default: %(default)s)")
    parser.add_argument("--budget", type=flags.positive_float, default=240, help="seconds a study (default: 240)")
    parser.add_argument("--moments", type=flags.positive_float, nargs="+", default=[60, 120, 240],
                        help="seconds at which the best is read (default: 60 120 240)")  # fmt: skip
    args = parser.parse_args(argv)

    from tunetrack.experiment.search import EXPERIMENT
    from tunetrack.machinery.study.workers import default_workers
    from workbench.search_comparison import best_by, run_study

    checks.prepare_data(parser, EXPERIMENT, Settings())
    rows = {"random first trial": [], "the defaults first": []}
    for seed in range(args.seeds):
        for first in [False, True] if seed % 2 == 0 else [True, False]:  # the machine's drift, spread
            study = run_study(Settings(), "tpe+median", seed, args.budget, default_workers(), defaults_first=first)
            rows["the defaults first" if first else "random first trial"].append(study["trials"])
            print(f"{time.strftime('%H:%M:%S')} seed {seed}, defaults first: {first}: {len(study['trials'])} trials",
                  flush=True)  # fmt: skip
    header = ["first trial", "first complete trial", *(f"best val_loss by {m:g} s" for m in args.moments)]
    print("| " + " | ".join(header) + " |\n|" + "---|" + "---:|" * (len(header) - 1))
    for name, studies in rows.items():
        first = [min(t["finished_s"] for t in trials if t["state"] == "COMPLETE") for trials in studies]
        cells = [_spread(first, "{:.0f} s")]
        cells += [_spread([best_by(trials, m) for trials in studies], "{:.4f}") for m in args.moments]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


def _spread(values: list[float], form: str) -> str:
    return f"{form.format(statistics.median(values))} ({form.format(min(values))} to {form.format(max(values))})"


if __name__ == "__main__":
    sys.exit(main())
