"""Compare samplers and pruners by what a study finds per minute, on the real MNIST.

Runs a study of each method (TPE with median, Hyperband or successive-halving pruning; Optuna's
GP sampler; random search) for --budget seconds of wall-clock time each, with the workers
`make tune` uses, for every seed; seed by seed, each seed's methods in a rotated order, so that
the machine's drift spreads over all of them. Prints, per method, the median and spread over the
seeds of the time to reach val_acc >= --target and of the best val_loss at the budget, and the
speed-up over random search; draws img/search.png (the best val_loss found by each moment) and
writes the table into docs/search.md. Each finished study is kept in --json as it ends, and
--from-json redraws the figures and the table from such a file without running anything.

    python scripts/compare_search.py --seeds 5 --budget 180
    python scripts/compare_search.py --methods tpe+median random+median --seeds 2 --budget 60
    python scripts/compare_search.py --from-json search.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tunetrack.experiment.settings import Settings
from tunetrack.machinery.cli import checks, flags


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(__doc__)
    from workbench.search_comparison import METHODS

    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="(default: all)")
    parser.add_argument("--seeds", type=flags.positive_int, default=5, help="seeds per method (default: %(default)s)")
    parser.add_argument(
        "--budget",
        type=flags.positive_float,
        default=180,
        help="seconds of wall-clock time a study (default: %(default)s)",
    )
    parser.add_argument("--target", type=float, default=0.98, help="the val_acc to reach (default: %(default)s)")
    parser.add_argument(
        "--workers", type=flags.positive_int, default=None, help="(default: as make tune: one per core)"
    )
    parser.add_argument("--data-dir", default=Settings().data_dir, help="where MNIST is kept (default: %(default)s)")
    parser.add_argument("--json", default="search.json", help="where the studies are kept (default: %(default)s)")
    parser.add_argument("--from-json", metavar="FILE", help="summarize the studies in FILE instead of running any")
    parser.add_argument("--figure", default="img/search.png", help="(default: %(default)s)")
    parser.add_argument(
        "--markdown", default="docs/search.md", help="the page whose table to update, or 'none' (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    import json

    from tunetrack.experiment.search import EXPERIMENT
    from tunetrack.machinery.study.workers import default_workers
    from workbench.report import replace_blocks
    from workbench.search_comparison import anytime_figure, compare, save, summarize, table_markdown

    if args.from_json:
        studies = json.loads(Path(args.from_json).read_text())
    else:
        settings = Settings(data_dir=args.data_dir)
        checks.prepare_data(parser, EXPERIMENT, settings)
        workers, studies = args.workers or default_workers(), []
        print(f"{len(args.methods)} methods x {args.seeds} seeds x {args.budget:.0f} s, {workers} workers", flush=True)

        def done(study: dict) -> None:
            studies.append(study)
            save(studies, Path(args.json))
            complete = sum(t["state"] == "COMPLETE" for t in study["trials"])
            print(
                f"{time.strftime('%H:%M:%S')} seed {study['seed']} {study['method']:<14} "
                f"{len(study['trials'])} trials, {complete} complete",
                flush=True,
            )

        compare(settings, args.methods, range(args.seeds), args.budget, workers, done)
    table = summarize(studies, args.target)
    markdown = table_markdown(table, args.target)
    print(markdown)
    anytime_figure(studies, Path(args.figure))
    print(f"wrote {args.figure}")
    if args.markdown != "none":
        page = Path(args.markdown)
        page.write_text(replace_blocks(page.read_text(), {"search": markdown}))
        print(f"updated the table of {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
