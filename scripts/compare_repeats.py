"""Measure what --repeats buys and costs on a small folder of real pictures: scikit-learn's
handwritten digits (1,797 grey 8x8 pictures, shipped with it), as a user's own folder.

For each seed, a study of --trials trials whose best --top trials train --most times more; then,
for R from 0 to --most, which trial R repeats would choose, the standard error of its mean, the
test accuracy of its weights, and what R repeats cost against the study: the table of
docs/objectives.md that --repeats' default follows.

    python scripts/compare_repeats.py --seeds 5 --trials 20
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tunetrack.machinery.cli import flags


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(__doc__)
    parser.add_argument("--seeds", type=flags.positive_int, default=5, help="studies (default: %(default)s)")
    parser.add_argument("--trials", type=flags.positive_int, default=20, help="trials a study (default: %(default)s)")
    parser.add_argument("--top", type=flags.positive_int, default=3, help="best trials repeated (default: %(default)s)")
    parser.add_argument("--most", type=flags.positive_int, default=5, help="repeats of each (default: %(default)s)")
    parser.add_argument("--objective", default="val_acc", help="what the studies optimize (default: %(default)s)")
    args = parser.parse_args(argv)

    from workbench.digits import export_digits
    from workbench.repeats_comparison import one_study, table

    with tempfile.TemporaryDirectory() as folder:
        digits = export_digits(Path(folder) / "digits")
        studies = []
        for seed in range(args.seeds):
            studies.append(one_study(digits, seed, args.trials, args.top, args.most, args.objective))
            chosen = [c["trial"] for c in studies[-1]["candidates"]]
            print(f"{time.strftime('%H:%M:%S')} seed {seed}: {studies[-1]['wall']:.0f} s, best trials {chosen}",
                  flush=True)  # fmt: skip
    print(table(studies, args.most, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
