"""Write the README's results from a finished study: figures into img/, tables into README.md.

Reads the study from its Optuna storage and the trials' curves from MLflow, then writes
img/optimization_history.png, img/param_importances.png, img/slice.png and
img/learning_curves.png (the three best trials), and replaces the tables between the
`<!-- report:... -->` markers of the README: the ten best trials, and the trials grouped by
each hyperparameter the study searched. It also writes img/digits/: pictures of the first three
MNIST test digits, made the way users' pictures come, that the README reads with
scripts/predict.py.

    python scripts/report.py
    python scripts/report.py --study-name wide --storage sqlite:///other.db --out /tmp/figures --readme none
"""

from __future__ import annotations

import sys
from pathlib import Path

from mnist_hpo import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(__doc__)
    cli.add_picture_flags(parser)
    parser.add_argument("--data-dir", default="data", help="where MNIST is kept (default: %(default)s)")
    parser.add_argument("--readme", default="README.md", help="the README to update, or 'none' (default: %(default)s)")
    args = parser.parse_args(argv)
    readme = None if args.readme == "none" else Path(args.readme)
    if readme is not None and not readme.is_file():
        parser.error(f"argument --readme: {args.readme!r} is not a file")

    from mnist_hpo import tracking
    from mnist_hpo.data import ensure_mnist_once, test_digits
    from mnist_hpo.report import (
        digit_pictures,
        groups_markdown,
        replace_blocks,
        searched_params,
        top_trials_markdown,
        write_figures,
    )

    study = cli.load_study(parser, args.storage, args.study_name)
    for path in write_figures(study, tracking.reader(args.tracking_uri), Path(args.out)):
        print(f"wrote {path}")
    ensure_mnist_once(args.data_dir)
    images, labels = test_digits(args.data_dir, 3)
    for path, _ in digit_pictures(list(zip(images.numpy(), labels.tolist(), strict=True)), Path(args.out) / "digits"):
        print(f"wrote {path}")
    if readme is not None:
        blocks = {"top-trials": top_trials_markdown(study)}
        blocks.update({f"by-{param}": groups_markdown(study, param) for param in searched_params(study)})
        readme.write_text(replace_blocks(readme.read_text(), blocks))
        print(f"updated the tables of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
