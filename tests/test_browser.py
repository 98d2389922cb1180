"""`mlflow ui` and optuna-dashboard show a study, checked in the pages a real browser renders
(headless Chromium)."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from conftest import TINY
from tiny.settings import TinySettings
from tunetrack.machinery.options import TuneOptions
from tunetrack.machinery.study.tuning import tune
from tunetrack.machinery.tracking.mlflow_runs import connect
from workbench.browser import (
    SCORE_COLUMNS,
    chromium_page,
    chromium_path,
    dashboard_path,
    runs_url,
    screenshot_charts,
    screenshot_dashboard,
    screenshot_runs_table,
    serve,
    serve_dashboard,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        chromium_path() is None, reason="Chromium is not installed (apt-get install chromium); .ci/run installs it"
    ),
]


@pytest.fixture(scope="module")
def shown(tiny_data, tmp_path_factory):
    """A 3-trial study on the tiny data set and `mlflow ui` serving its store, as (study,
    tracker, url), for every test here; each test opens a browser of its own (the UI keeps
    state in the browser)."""
    folder = tmp_path_factory.mktemp("shown")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # MLflow puts this SQLite store's artifacts in ./mlruns
        tracker = connect(f"sqlite:///{folder / 'mlflow.db'}", "shown")
        settings = TinySettings(data_dir=str(tiny_data))
        options = TuneOptions(n_trials=3, workers=1, study_name="pictured", storage=f"sqlite:///{folder / 'optuna.db'}",
                              accelerator="cpu", repeats=0, baseline="none").resolved(settings)  # fmt: skip
        session = tune(TINY, settings, options, lambda: tracker)
    with serve(tracker.tracking_uri) as url:
        yield session.study, tracker, url, options.storage


def colours(image) -> int:
    """How many colours a picture has: a blank page has one or two."""
    return len(image.getcolors(maxcolors=image.width * image.height))


@pytest.fixture
def page():
    with chromium_page(width=1400, height=900) as page:
        yield page


def test_mlflow_ui_lists_the_study_and_shows_a_trials_curve(shown, page):
    study, tracker, url, _ = shown
    trials = {t.number: t.user_attrs["mlflow_run_id"] for t in study.trials}
    val_loss = tracker.client.get_run(trials[1]).data.metrics["val_loss"]

    page.goto(runs_url(url, tracker.experiment_id, ""))
    parent = page.get_by_role("row").filter(has_text="pictured")
    parent.wait_for(timeout=60_000)
    parent.locator("button[data-component-id*='runnamecellrenderer']").click()  # expand the study's run
    for number in trials:
        page.get_by_role("row").filter(has_text=f"trial {number}").wait_for(timeout=30_000)
    assert page.get_by_role("row").filter(has_text="trial").count() == len(trials)

    page.goto(f"{url}/#/experiments/{tracker.experiment_id}/runs/{trials[1]}")
    metric = page.get_by_role("row").filter(has_text="val_loss").filter(has_not_text="best_val_loss")
    metric.wait_for(timeout=60_000)
    assert repr(val_loss)[:6] in metric.inner_text()
    assert page.get_by_text("trial 1", exact=True).first.is_visible()


def test_screenshots_show_the_best_trials_first_and_their_curves(shown, page, tmp_path):
    study, tracker, url, _ = shown
    by_loss = sorted(study.trials, key=lambda t: t.value)
    params = list(by_loss[0].params)
    screenshot_runs_table(
        page, url, tracker.experiment_id, study.user_attrs["uid"], params, str(tmp_path / "table.png")
    )
    # The rows, top to bottom, are the trials from the lowest val_loss up, with their columns.
    names = [re.search(r"trial \d+", text).group() for text in page.get_by_role("row").all_inner_texts()
             if re.search(r"trial \d+", text)]  # fmt: skip
    assert names == [f"trial {t.number}" for t in by_loss]
    for column in (*SCORE_COLUMNS, *params):
        assert page.get_by_role("columnheader", name=column, exact=True).count() >= 1, column
    # Each trial's data, in MLflow's Datasets column: the data set's name and its digest.
    digest = tracker.client.get_run(by_loss[0].user_attrs["mlflow_run_id"]).inputs.dataset_inputs[0].dataset.digest
    assert page.get_by_text(f"blocks ({digest})", exact=False).count() >= 1

    best_two = by_loss[:2]
    screenshot_charts(
        page, url, tracker.experiment_id, [t.user_attrs["mlflow_run_id"] for t in best_two],
        str(tmp_path / "charts.png"),
    )  # fmt: skip
    for metric in ("train_loss", "val_loss"):  # the charts' titles
        assert page.get_by_text(metric, exact=True).count() >= 1, metric
    for trial in best_two:  # each chart's legend names the two trials
        assert page.get_by_text(f"trial {trial.number}", exact=True).count() >= 1
    for name in ("table.png", "charts.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size == (1400, 900)  # the whole page, as the browser drew it
            assert colours(image) > 50  # text and lines, not a blank


@pytest.mark.skipif(dashboard_path() is None, reason="optuna-dashboard is not installed: pip install -e '.[dashboard]'")
def test_optuna_dashboard_shows_the_study_and_its_history(shown, page, tmp_path):
    study, _, _, storage = shown
    with serve_dashboard(storage) as url:
        page.goto(f"{url}/dashboard")
        page.get_by_text("1. pictured", exact=True).first.wait_for(timeout=60_000)  # the study, listed
        screenshot_dashboard(page, url, study._study_id, str(tmp_path / "dashboard.png"))
        for title in ("History", "Hyperparameter Importance", "val_loss"):  # the plots, the objective named
            assert page.locator(f'text="{title}" >> visible=true').count() >= 1, title
    with Image.open(tmp_path / "dashboard.png") as image:
        assert image.size == (1400, 900) and colours(image) > 50
