"""`mlflow ui` and optuna-dashboard in a real browser: start each server on a free loopback port
and always stop it, and open Debian's Chromium through Playwright (a test tool's own browser
download does not work offline). Used by scripts/screenshots.py and the browser tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator

from workbench.servers import NO_JOBS, free_port, wait_until_healthy

# Headless Chromium as root, quiet on a machine whose network is closed.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    """Debian's Chromium (apt-get install chromium), or CHROMIUM if set."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def serve(backend_store_uri: str, timeout: float = 90) -> Iterator[str]:
    """Run ``mlflow ui`` for ``backend_store_uri`` on a free loopback port; yield its URL."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", backend_store_uri,
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with _serving(command, f"http://127.0.0.1:{port}", "/health", "mlflow ui", timeout) as url:
        yield url


def dashboard_path() -> str | None:
    """optuna-dashboard, of this environment (the [dashboard] extra), or None."""
    return shutil.which("optuna-dashboard", path=os.path.dirname(sys.executable))


@contextlib.contextmanager
def serve_dashboard(storage: str, timeout: float = 90) -> Iterator[str]:
    """Run optuna-dashboard for ``storage`` on a free loopback port; yield its URL."""
    port = free_port()
    command = [dashboard_path(), storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"]
    with _serving(command, f"http://127.0.0.1:{port}", "/api/meta", "optuna-dashboard", timeout) as url:
        yield url


@contextlib.contextmanager
def _serving(command: list[str], url: str, health: str, what: str, timeout: float) -> Iterator[str]:
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **NO_JOBS}
        )
        try:
            try:
                wait_until_healthy(url, server, what, timeout, health)
            except RuntimeError as error:
                log.seek(0)
                raise RuntimeError(f"{error}:\n{log.read()[-2000:]}") from None
            yield url
        finally:
            # The whole process group: mlflow ui runs its web server as a child process.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 900):
    """A Playwright page in headless Chromium."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError("Chromium is not installed: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


# The UI opens experiments in its GenAI view unless told otherwise; runs live in this one.
TRAINING_VIEW = "workflowType=machine_learning"
# The runs table's columns beside the searched parameters.
SCORE_COLUMNS = ("best_val_loss", "best_val_acc", "best_epoch")


def runs_url(url: str, experiment_id: str, search_filter: str, **params: str) -> str:
    query = urllib.parse.urlencode({"searchFilter": search_filter, **params})
    return f"{url}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}&{query}"


def study_filter(study_uid: str) -> str:
    """The complete trials of one study, by its id: a study's name may hold any quote."""
    return f"tags.`optuna.study_uid` = '{study_uid}' AND tags.`optuna.state` = 'COMPLETE'"


def screenshot_runs_table(page, url: str, experiment_id: str, study_uid: str, params: list[str], path: str) -> None:
    """The study's complete trials, best val_loss first, with their scores and ``params``."""
    page.goto(
        runs_url(url, experiment_id, study_filter(study_uid), orderByKey="metrics.`best_val_loss`", orderByAsc="true")
    )
    page.get_by_role("row").filter(has_text="trial").first.wait_for(timeout=60_000)
    _close_assistant(page)
    page.get_by_role("button", name="Columns", exact=True).click()
    for name in ("Source", "Models", *SCORE_COLUMNS, *params):  # hide the empty, show ours
        page.get_by_text(name, exact=True).last.click()
    page.keyboard.press("Escape")
    page.wait_for_timeout(1000)
    page.screenshot(path=path)


def screenshot_charts(page, url: str, experiment_id: str, run_ids: list[str], path: str) -> None:
    """The chart view of ``run_ids`` (trials nested under their study's run): their losses."""
    ids = ", ".join(f"'{run_id}'" for run_id in run_ids)
    page.goto(runs_url(url, experiment_id, f"attributes.run_id IN ({ids})", compareRunsMode="CHART"))
    parent = page.get_by_role("row").filter(has=page.locator("button[data-component-id*='runnamecellrenderer']"))
    parent.first.wait_for(timeout=60_000)
    _close_assistant(page)
    parent.first.locator("button[data-component-id*='runnamecellrenderer']").click()  # show the trials
    parent.first.locator("label:has(input.is-visibility-toggle-checkbox)").click()  # hide the study's run
    page.get_by_placeholder("Search metric charts").fill("loss")
    page.wait_for_timeout(3000)  # the charts animate in
    page.screenshot(path=path)


def screenshot_dashboard(page, url: str, study_id: int, path: str) -> None:
    """optuna-dashboard's page of a study: its history and its parameters' importances."""
    page.goto(f"{url}/dashboard/studies/{study_id}")
    page.locator('text="History" >> visible=true').first.wait_for(timeout=60_000)  # not the menu's
    page.wait_for_timeout(3000)  # the plots draw in
    page.screenshot(path=path)


def _close_assistant(page) -> None:
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()
