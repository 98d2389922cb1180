"""Screenshot a study in `mlflow ui` and in optuna-dashboard: img/table.png, img/charts.png and
img/dashboard.png.

Starts `mlflow ui` on a free loopback port against the study's MLflow store, opens it in
headless Chromium (Debian's package: apt-get install chromium), captures the runs table of
the study's complete trials sorted by val_loss (with the data each trained on) and the chart
view of its three best trials; then does the same with optuna-dashboard on the study's
storage; and always stops the servers.

    python scripts/screenshots.py
    python scripts/screenshots.py --study-name mnist-cnn --storage sqlite:///elsewhere/optuna.db \
        --tracking-uri sqlite:///elsewhere/mlflow.db
"""

from __future__ import annotations

import sys
from pathlib import Path

from tunetrack.experiment.settings import Settings
from tunetrack.machinery.cli import checks, flags


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(__doc__)
    flags.add_picture_flags(parser, Settings().study)
    args = parser.parse_args(argv)

    from tunetrack.machinery.study.results import top_trials
    from tunetrack.machinery.study.studies import RUN_ATTR, uid
    from tunetrack.machinery.tracking import mlflow_runs
    from workbench import browser
    from workbench.report import searched_params

    if browser.chromium_path() is None:
        flags.fail(parser.prog, "Chromium is not installed: apt-get install chromium (or set CHROMIUM)")
    if browser.dashboard_path() is None:
        flags.fail(parser.prog, "optuna-dashboard is not installed: pip install -e '.[dashboard]'")
    study = checks.load_study(parser, args.storage, args.study_name)
    tracker = mlflow_runs.reader(args.tracking_uri)
    best = [trial.user_attrs[RUN_ATTR] for trial in top_trials(study, 3)]
    experiment_id = tracker.experiment_of(best[0])
    if experiment_id is None:
        parser.error(
            f"argument --tracking-uri: {tracker.tracking_uri} does not hold the runs of study {args.study_name!r}"
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with browser.serve(tracker.tracking_uri) as url, browser.chromium_page() as page:
        params = list(searched_params(study))
        browser.screenshot_runs_table(page, url, experiment_id, uid(study), params, str(out / "table.png"))
        print(f"wrote {out / 'table.png'}")
        browser.screenshot_charts(page, url, experiment_id, best, str(out / "charts.png"))
        print(f"wrote {out / 'charts.png'}")
    with browser.serve_dashboard(args.storage) as url, browser.chromium_page() as page:
        browser.screenshot_dashboard(page, url, study._study_id, str(out / "dashboard.png"))
        print(f"wrote {out / 'dashboard.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
