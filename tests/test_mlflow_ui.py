"""`mlflow ui` shows a study, checked in the page a real browser renders (headless Chromium)."""

from __future__ import annotations

import pytest

from mnist_hpo.mlflow_ui import chromium_page, chromium_path, runs_url, screenshot_charts, screenshot_runs_table, serve
from mnist_hpo.tuning import tune

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        chromium_path() is None, reason="Chromium is not installed (apt-get install chromium); .ci/run installs it"
    ),
]


def test_mlflow_ui_lists_the_study_and_shows_a_trials_curve(study_env):
    tracker, storage, settings = study_env
    session = tune(tracker, storage, "in-the-browser", n_trials=2, workers=1, **settings)
    trials = {t.number: t.user_attrs["mlflow_run_id"] for t in session.study.trials}
    val_loss = tracker.client.get_run(trials[1]).data.metrics["val_loss"]

    with serve(tracker.tracking_uri) as url, chromium_page() as page:
        page.goto(runs_url(url, tracker.experiment_id, ""))
        parent = page.get_by_role("row").filter(has_text="in-the-browser")
        parent.wait_for(timeout=60_000)
        parent.locator("button[data-component-id*='runnamecellrenderer']").click()  # expand the study's run
        for number in trials:
            page.get_by_role("row").filter(has_text=f"trial {number}").wait_for(timeout=30_000)
        assert page.get_by_role("row").filter(has_text="trial").count() == 2

        page.goto(f"{url}/#/experiments/{tracker.experiment_id}/runs/{trials[1]}")
        metric = page.get_by_role("row").filter(has_text="val_loss").filter(has_not_text="best_val_loss")
        metric.wait_for(timeout=60_000)
        assert repr(val_loss)[:6] in metric.inner_text()
        assert page.get_by_text("trial 1", exact=True).first.is_visible()


def test_screenshots_of_the_table_and_the_charts(study_env, tmp_path):
    tracker, storage, settings = study_env
    session = tune(tracker, storage, "pictured", n_trials=3, workers=1, **settings)
    best = sorted((t for t in session.study.trials), key=lambda t: t.value)[:2]
    with serve(tracker.tracking_uri) as url, chromium_page() as page:
        screenshot_runs_table(page, url, tracker.experiment_id, "pictured", str(tmp_path / "table.png"))
        assert page.get_by_role("columnheader", name="best_val_loss", exact=True).count() >= 1
        screenshot_charts(
            page,
            url,
            tracker.experiment_id,
            [t.user_attrs["mlflow_run_id"] for t in best],
            str(tmp_path / "charts.png"),
        )
        assert page.get_by_text("val_loss", exact=True).count() >= 1  # the chart's title
    for name in ("table.png", "charts.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
