"""Write the README's results from a finished study: figures into img/, tables into README.md.

Reads the study from its Optuna storage and the trials' curves from MLflow, then writes
img/optimization_history.png, img/param_importances.png, img/slice.png and
img/learning_curves.png (the three best trials), and replaces the tables between the
`<!-- report:... -->` markers of the README: the ten best trials, and the trials grouped by
batch size, hidden dim and learning rate.

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
    parser.add_argument("--storage", default="sqlite:///optuna.db", help="its Optuna storage (default: %(default)s)")
    parser.add_argument("--readme", default="README.md", help="the README to update, or 'none' (default: %(default)s)")
    args = parser.parse_args(argv)
    readme = None if args.readme == "none" else Path(args.readme)
    if readme is not None and not readme.is_file():
        parser.error(f"argument --readme: {args.readme!r} is not a file")

    import optuna
    from mlflow.tracking import MlflowClient

    from mnist_hpo.report import groups_markdown, replace_blocks, top_trials_markdown, write_figures
    from mnist_hpo.tracking import default_tracking_uri

    try:
        study = optuna.load_study(study_name=args.study_name, storage=args.storage)
    except KeyError:
        parser.error(f"argument --study-name: no study {args.study_name!r} in {args.storage}")
    except Exception as error:  # noqa: BLE001 - SQLAlchemy and Optuna raise many kinds
        parser.error(f"argument --storage: cannot open {args.storage!r}: {str(error).splitlines()[0]}")
    if not study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        parser.error(f"argument --study-name: study {args.study_name!r} has no complete trial yet")

    client = MlflowClient(args.tracking_uri or default_tracking_uri())
    for path in write_figures(study, client, Path(args.out)):
        print(f"wrote {path}")
    if readme is not None:
        blocks = {"top-trials": top_trials_markdown(study)}
        blocks.update({f"by-{param}": groups_markdown(study, param) for param in ("batch_size", "hidden_dim", "lr")})
        readme.write_text(replace_blocks(readme.read_text(), blocks))
        print(f"updated the tables of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
