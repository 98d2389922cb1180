"""Screenshot `mlflow ui` showing a study: img/table.png and img/charts.png.

Starts `mlflow ui` on a free loopback port against the study's MLflow store, opens it in
headless Chromium (Debian's package: apt-get install chromium), captures the runs table of
the study's complete trials sorted by val_loss and the chart view of its three best trials,
and always stops the server.

    python scripts/screenshots.py
    python scripts/screenshots.py --study-name wide --tracking-uri sqlite:///elsewhere/mlflow.db
"""

from __future__ import annotations

import sys
from pathlib import Path

from mnist_hpo import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(__doc__)
    cli.add_picture_flags(parser)
    parser.add_argument("--experiment", default="mnist-tune", help="its MLflow experiment (default: %(default)s)")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from mnist_hpo import mlflow_ui
    from mnist_hpo.tracking import default_tracking_uri

    if mlflow_ui.chromium_path() is None:
        cli.fail(parser.prog, "Chromium is not installed: apt-get install chromium (or set CHROMIUM)")
    uri = args.tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        parser.error(f"argument --experiment: no experiment {args.experiment!r} in {uri}")
    best = client.search_runs(
        [experiment.experiment_id], mlflow_ui.study_filter(args.study_name),
        order_by=["metrics.best_val_loss ASC"], max_results=3,
    )  # fmt: skip
    if not best:
        parser.error(f"argument --study-name: no complete trial of study {args.study_name!r} in {args.experiment!r}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with mlflow_ui.serve(uri) as url, mlflow_ui.chromium_page() as page:
        mlflow_ui.screenshot_runs_table(page, url, experiment.experiment_id, args.study_name, str(out / "table.png"))
        print(f"wrote {out / 'table.png'}")
        run_ids = [run.info.run_id for run in best]
        mlflow_ui.screenshot_charts(page, url, experiment.experiment_id, run_ids, str(out / "charts.png"))
        print(f"wrote {out / 'charts.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
