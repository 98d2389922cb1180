"""A search space, as the experiment declares it: a trial's settings, its console line, the
summary, the tables, the CSV, the plots and the study's definition all follow it, whatever
parameters it holds (here the tiny experiment's conv network, with a hyperparameter of its own)."""

from __future__ import annotations

import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from tunetrack.machinery.options import PRUNERS, SAMPLERS
from tunetrack.machinery.study.plots import study_figures
from tunetrack.machinery.study.samplers import make_pruner, make_sampler
from tunetrack.machinery.study.studies import StudyMismatch, objective_of
from tunetrack.machinery.study.summary import TrialReport
from workbench.report import groups_markdown, searched_params, top_trials_markdown

SPACE = {
    "batch_size": CategoricalDistribution([32, 64, 128, 256]),
    "width": IntDistribution(32, 512),
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
}


def test_a_trial_says_how_it_ended_in_one_aligned_line():
    params = {"batch_size": 64, "width": 77, "lr": 0.00123}
    metrics = {"val_loss": 0.12344, "val_acc": 0.95671, "params": 1234.0, "latency_ms": 0.0123}
    complete = TrialReport(3, "COMPLETE", params, SPACE, metrics, 12.34)
    assert complete.line() == (
        "trial   3 COMPLETE batch_size= 64 width= 77 lr=1.23e-03  val_loss 0.1234 val_acc 0.9567   12.3 s"
    )
    # The objective's first, and params or latency_ms only where they are objectives.
    assert complete.line(("val_acc", "params")) == (
        "trial   3 COMPLETE batch_size= 64 width= 77 lr=1.23e-03  val_acc 0.9567 params 1,234 val_loss 0.1234   12.3 s"
    )
    params = {**params, "width": 512}
    pruned = TrialReport(12, "PRUNED", params, SPACE, {}, 2.0, "pruned after epoch 2")
    assert pruned.line() == "trial  12 PRUNED   batch_size= 64 width=512 lr=1.23e-03  pruned after epoch 2    2.0 s"


def test_every_table_plot_and_column_follows_the_space_searched(study_env, capsys, tmp_path):
    session = study_env("conv", n_trials=3, model="conv")
    study, out = session.study, capsys.readouterr().out
    names = ["batch_size", "lr", "width", "kernel"]
    for trial in study.trials:
        assert list(trial.params) == names
        assert trial.user_attrs["settings"]["kernel"] == trial.params["kernel"]  # trained with it
        assert f"trial {trial.number:>3} COMPLETE" in out and f"kernel={trial.params['kernel']}" in out
    summary = out.split("\nstudy 'conv'")[1].splitlines()
    assert summary[1].split()[3:7] == names
    assert "kernel=" in out.split("best: trial")[1].splitlines()[0]

    definition = study.user_attrs["definition"]
    assert "kernel" in definition["space"] and "kernel" not in definition["settings"]
    assert top_trials_markdown(study).splitlines()[0].split(" | ")[6] == "kernel"
    assert list(searched_params(study)) == names
    rows = groups_markdown(study, "kernel").splitlines()
    assert rows[0].startswith("| kernel | trials |") and len(rows) == 2 + 2
    assert sum(int(row.split("|")[2]) for row in rows[2:]) == len(study.trials)
    slices = study_figures(study, objective_of(study))["slice.png"]
    assert "kernel" in {ax.get_xlabel() for ax in slices.axes}

    tracker = study_env.tracker
    parent = tracker.client.get_run(session.parent_run_id)
    best = min(study.trials, key=lambda t: t.value)
    assert parent.data.tags["best.kernel"] == str(best.params["kernel"])
    csv = pd.read_csv(tracker.client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path)))
    assert "params_kernel" in csv.columns


def test_a_study_refuses_to_continue_with_another_space(study_env, monkeypatch):
    from tiny import experiment as tiny

    study_env("grown", n_trials=1)
    monkeypatch.setitem(tiny.SEARCH_SPACE, "clip", FloatDistribution(0.1, 1.0))
    from tunetrack.machinery.study.studies import StudyMismatch

    with pytest.raises(StudyMismatch, match="searched another space than the experiment's now \\(clip differ\\)"):
        study_env("grown", n_trials=1)


def test_the_groups_of_a_numeric_parameter_hold_every_value_once():
    import optuna

    study = optuna.create_study()
    space = {"width": SPACE["width"]}  # 32 to 512
    for value in (32, 151, 152, 400, 512):
        trial = optuna.trial.create_trial(params={"width": value}, distributions=space, value=0.1,
                                          user_attrs={"val_acc": 0.9})  # fmt: skip
        study.add_trial(trial)
    rows = groups_markdown(study, "width").splitlines()[2:]
    assert [row.split(" | ")[0].strip("| ") for row in rows] == ["32-151", "152-271", "272-391", "392-512"]
    assert [int(row.split("|")[2]) for row in rows] == [2, 1, 0, 2]


def test_every_sampler_and_pruner_tune_py_offers_is_made_by_its_name():
    for name in SAMPLERS:
        assert make_sampler(name, seed=0).__class__.__name__ == "SeededPerTrial"
    assert {type(make_pruner(name, True, 10)).__name__ for name in PRUNERS} == {
        "MedianPruner", "HyperbandPruner", "SuccessiveHalvingPruner"
    }  # fmt: skip
    with pytest.raises(KeyError):
        make_sampler("grid", seed=0)


def test_a_new_study_tries_the_experiments_defaults_first_and_says_so(study_env, capsys, tiny_settings):
    session = study_env("defaults", n_trials=2)
    first = session.study.trials[0]
    defaults = {name: getattr(tiny_settings, name) for name in ("batch_size", "width", "lr")}
    assert first.params == defaults  # read back from optuna.db
    assert session.study.user_attrs["definition"]["first_trials"] == [
        {"from": "the experiment's defaults", "params": defaults}
    ]
    assert "first trials: the experiment's defaults (batch_size=32, lr=5.00e-02, width=16)" in capsys.readouterr().out
    random = study_env("random", n_trials=1, options={"defaults_first": False})
    assert random.study.trials[0].params != defaults


def test_warm_start_tries_another_studys_best_where_its_space_holds_them(study_env, capsys):
    dense = study_env("dense", n_trials=4, options={"defaults_first": False})
    best = sorted(dense.study.trials, key=lambda t: t.value)[:2]
    conv = study_env("conv", n_trials=3, model="conv", options={"defaults_first": False, "warm_start": "dense:2"})
    out = capsys.readouterr().out
    for trial, source in zip(conv.study.trials, best, strict=False):  # the conv network's kernel: its sampler's
        assert {k: trial.params[k] for k in source.params} == source.params and "kernel" in trial.params
    assert f"first trials: study 'dense', trial {best[0].number} (" in out
    with pytest.raises(StudyMismatch, match="there is no study 'nowhere' in this storage"):
        study_env("other", n_trials=1, options={"warm_start": "nowhere"})
