"""The comparison of samplers and pruners (scripts/compare_search.py), on the tiny data: the
order it runs the studies in, what it keeps of them, and the figures it draws from them."""

from __future__ import annotations

import dataclasses
import math
import statistics

from conftest import TINY
from workbench.search_comparison import anytime_figure, best_by, compare, summarize, table_markdown, time_to_target

PNG = b"\x89PNG\r\n\x1a\n"


def test_methods_take_turns_seed_by_seed_and_every_trial_is_timed(tiny_settings, tmp_path):
    settings = dataclasses.replace(tiny_settings, max_epochs=1)
    ended = []
    studies = compare(settings, ["tpe+median", "random+median"], [0, 1], budget=2, workers=1, done=ended.append,
                      experiment=TINY)  # fmt: skip
    assert [(s["seed"], s["method"]) for s in studies] == [
        (0, "tpe+median"), (0, "random+median"), (1, "random+median"), (1, "tpe+median"),
    ]  # fmt: skip
    assert ended == studies
    for study in studies:
        trials = study["trials"]
        assert trials and all(t["state"] == "COMPLETE" and t["finished_s"] > 0 for t in trials)
        # No trial starts after the budget but each worker's first: the last one began in time.
        assert sorted(t["finished_s"] for t in trials)[-2:][0] <= study["budget"] or len(trials) == 1
    # The same seed, the same method: the same first proposal.
    first = {(s["method"], s["seed"]): s["trials"][0]["params"] for s in studies}
    assert first[("random+median", 0)] != first[("random+median", 1)]

    # What the summary reads of them, without the machine's speed deciding: every trial counts
    # (a budget past the last one's finish), and every trial reaches the target.
    timed = [{**study, "budget": 60} for study in studies]
    table = summarize(timed, target=0.0)
    assert set(table) == {"tpe+median", "random+median"} and table["random+median"]["speedup_over_random"] == 1.0
    for method, row in table.items():
        mine = [s for s in timed if s["method"] == method]
        assert row["best_at_budget"] == [min(t["value"] for t in s["trials"]) for s in mine]
        assert row["time_to_target"] == [min(t["finished_s"] for t in s["trials"]) for s in mine]
        assert row["reached"] == 2 and row["trials"] == statistics.median(len(s["trials"]) for s in mine)
    markdown = table_markdown(table, 0.0).splitlines()
    assert markdown[0].startswith("| method | median time to val_acc >= 0.0") and len(markdown) == 2 + 2
    anytime_figure(timed, tmp_path / "search.png")
    assert (tmp_path / "search.png").read_bytes().startswith(PNG)
    # A budget so short on a slow machine that no trial finished within it still gives a picture.
    anytime_figure([{**study, "budget": 0} for study in studies], tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes().startswith(PNG)


def test_time_to_target_and_best_so_far_read_the_trials_as_they_finished():
    trials = [
        {"state": "COMPLETE", "value": 0.30, "val_acc": 0.90, "finished_s": 10.0},
        {"state": "PRUNED", "value": None, "val_acc": None, "finished_s": 12.0},
        {"state": "COMPLETE", "value": 0.20, "val_acc": 0.985, "finished_s": 30.0},
        {"state": "COMPLETE", "value": 0.10, "val_acc": 0.99, "finished_s": 250.0},  # after the budget
    ]
    assert [best_by(trials, s) for s in (5, 10, 29, 30, 240)] == [math.inf, 0.30, 0.30, 0.20, 0.20]
    assert time_to_target(trials, 0.98, budget=240) == 30.0 and time_to_target(trials, 0.99, budget=240) == math.inf
    studies = [
        {"method": "m", "seed": s, "budget": 240, "trials": t} for s, t in enumerate([trials, trials[:2], trials])
    ]
    row = summarize(studies, 0.98)["m"]
    assert row["time_to_target"] == [30.0, math.inf, 30.0] and row["median_time_to_target"] == 30.0
    assert row["reached"] == 2 and row["speedup_over_random"] is None  # no random search to compare with
    assert "30 s (30 to not reached)" in table_markdown({"m": row}, 0.98)


def test_the_worker_comparison_splits_each_core_count_and_reads_each_moment():
    """scripts/compare_workers.py's configurations and summary (its studies are the search
    comparison's run_study, pinned to the cores in a process of its own)."""
    from workbench.worker_comparison import configurations
    from workbench.worker_comparison import summarize as by_workers
    from workbench.worker_comparison import table_markdown as workers_table

    assert configurations(1) == [(1, 1)]
    assert configurations(2) == [(1, 1), (2, 1), (2, 2)]
    assert configurations(6)[-4:] == [(6, 1), (6, 2), (6, 4), (6, 6)]

    def study(cores, workers, seed, finished):  # (state, value, seconds) of each trial
        trials = [{"state": state, "value": value, "finished_s": at} for state, value, at in finished]
        return {"cores": cores, "workers": workers, "seed": seed, "budget": 120, "trials": trials}

    studies = [
        study(2, 1, 0, [("COMPLETE", 0.3, 20), ("PRUNED", 0.5, 50), ("COMPLETE", 0.1, 100)]),
        study(2, 1, 1, [("COMPLETE", 0.2, 40), ("COMPLETE", 0.15, 70)]),
        study(2, 2, 0, [("COMPLETE", 0.25, 25), ("COMPLETE", 0.2, 26), ("COMPLETE", 0.05, 130)]),
    ]
    one, two = by_workers(studies)
    assert (one["cores"], one["workers"], two["workers"]) == (2, 1, 2)
    assert one["trials_a_minute"] == 1.25 and one["first_complete_s"] == 30  # medians of 1.5 and 1; of 20 and 40
    assert one["best_by"] == {30: statistics.median([0.3, math.inf]), 60: 0.25, "budget": 0.125}
    assert two["best_by"]["budget"] == 0.2  # a trial that ended past the budget does not count
    table = workers_table([one, two])
    assert table.splitlines()[0].count("|") == 8 and "| 2 | 2 | 1.5 | 25 s |" in table
