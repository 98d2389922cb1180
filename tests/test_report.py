"""scripts/report.py's pieces: the figures and the README's tables, from a tiny study."""

from __future__ import annotations

import pytest

from workbench.report import groups_markdown, replace_blocks, top_trials_markdown, write_figures

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def small_study(study_env):
    return study_env("report", n_trials=3).study, study_env.tracker


def test_figures_are_written_as_png(small_study, tmp_path):
    study, tracker = small_study
    written = write_figures(study, tracker, tmp_path / "img")
    assert sorted(p.name for p in written) == [
        "learning_curves.png", "optimization_history.png", "param_importances.png", "slice.png",
    ]  # fmt: skip
    for path in written:
        assert path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000


def test_tables_count_every_trial_and_land_between_their_markers(small_study):
    study, _ = small_study
    top = top_trials_markdown(study).splitlines()
    assert len(top) == 2 + 3 and top[2].startswith(f"| {min(study.trials, key=lambda t: t.value).number} |")
    for param in ("batch_size", "lr", "width"):
        rows = groups_markdown(study, param).splitlines()[2:]
        assert sum(int(row.split("|")[2]) for row in rows) == 3, param  # each trial in one group

    readme = "intro\n<!-- report:top-trials -->\nold\n<!-- /report:top-trials -->\nrest\n"
    updated = replace_blocks(readme, {"top-trials": "\n".join(top)})
    assert "old" not in updated and "\n".join(top) in updated and updated.endswith("rest\n")
    assert replace_blocks(updated, {"top-trials": "\n".join(top)}) == updated  # idempotent
    with pytest.raises(ValueError, match="no <!-- report:by-lr -->"):
        replace_blocks(readme, {"by-lr": "x"})
