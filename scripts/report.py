"""Write the results of a finished study: figures into img/, tables into docs/results.md.

Reads the study from its Optuna storage and the trials' curves from MLflow, then writes
img/optimization_history.png, img/param_importances.png, img/slice.png and
img/learning_curves.png (the three best trials), and replaces the tables between the
`<!-- report:... -->` markers of docs/results.md: the ten best trials, and the trials grouped
by each hyperparameter the study searched. It also writes img/digits/: pictures of the first
three MNIST test digits, made the way users' pictures come, that the README reads with
scripts/predict.py.

    python scripts/report.py
    python scripts/report.py --study-name mnist-cnn --out /tmp/figures --markdown none
"""

from __future__ import annotations

import sys
from pathlib import Path

from tunetrack.experiment.settings import Settings
from tunetrack.machinery.cli import checks, flags


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(__doc__)
    flags.add_picture_flags(parser, Settings().study)
    parser.add_argument("--data-dir", default=Settings().data_dir, help="where MNIST is kept (default: %(default)s)")
    parser.add_argument(
        "--markdown",
        default="docs/results.md",
        help="the page whose tables to update, or 'none' (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    page = None if args.markdown == "none" else Path(args.markdown)
    if page is not None and not page.is_file():
        parser.error(f"argument --markdown: {args.markdown!r} is not a file")

    from tunetrack.experiment.data import MNISTDataModule
    from tunetrack.machinery.tracking import mlflow_runs
    from workbench.photos import digit_pictures
    from workbench.report import groups_markdown, replace_blocks, searched_params, top_trials_markdown, write_figures

    study = checks.load_study(parser, args.storage, args.study_name)
    for path in write_figures(study, mlflow_runs.reader(args.tracking_uri), Path(args.out)):
        print(f"wrote {path}")
    data = MNISTDataModule(Settings(data_dir=args.data_dir))
    data.prepare_data()
    images, labels = data.read()["test"]
    digits = [(images[i, 0].numpy(), int(labels[i])) for i in range(3)]
    for path, _ in digit_pictures(digits, Path(args.out) / "digits"):
        print(f"wrote {path}")
    if page is not None:
        blocks = {"top-trials": top_trials_markdown(study)}
        blocks.update({f"by-{param}": groups_markdown(study, param) for param in searched_params(study)})
        page.write_text(replace_blocks(page.read_text(), blocks))
        print(f"updated the tables of {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
