"""The search space: one declaration from which a trial's configuration, its console line, the
summary, the README's tables, the CSV and the plots all follow."""

from __future__ import annotations

import dataclasses

import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FixedTrial

from conftest import with_base
from mnist_hpo import search
from mnist_hpo.config import TrainConfig
from mnist_hpo.plots import study_figures
from mnist_hpo.report import groups_markdown, searched_params, top_trials_markdown
from mnist_hpo.results import top_trials_table
from mnist_hpo.search import SEARCH_SPACE, suggest_config
from mnist_hpo.trial import RUN_ATTR, TrialReport
from mnist_hpo.tuning import tune


def test_every_searched_name_is_a_setting_of_one_training_run():
    assert set(SEARCH_SPACE) <= {field.name for field in dataclasses.fields(TrainConfig)}


def test_a_trial_trains_its_point_of_the_space_from_a_seed_of_its_own():
    base = TrainConfig(max_epochs=3, val_size=500, seed=10)
    trial = FixedTrial({"batch_size": 128, "hidden_dim": 300, "lr": 3e-3}, number=7)
    assert suggest_config(trial, base) == TrainConfig(
        batch_size=128, hidden_dim=300, lr=3e-3, max_epochs=3, val_size=500, seed=17
    )
    with pytest.raises(ValueError, match=r"100.* not in \(32, 64, 128, 256\)"):
        suggest_config(FixedTrial({"batch_size": 100, "hidden_dim": 300, "lr": 3e-3}), base)


def test_a_trial_says_how_it_ended_in_one_aligned_line():
    params = {"batch_size": 64, "hidden_dim": 77, "lr": 0.00123}
    complete = TrialReport(3, "COMPLETE", params, SEARCH_SPACE, 0.12344, 0.95671, 12.34)
    assert complete.line() == (
        "trial   3 COMPLETE batch_size= 64 hidden_dim= 77 lr=1.23e-03  val_loss 0.1234 val_acc 0.9567   12.3 s"
    )
    params = {**params, "hidden_dim": 512}
    pruned = TrialReport(12, "PRUNED", params, SEARCH_SPACE, None, None, 2.0, "pruned after epoch 2")
    assert pruned.line() == (
        "trial  12 PRUNED   batch_size= 64 hidden_dim=512 lr=1.23e-03  pruned after epoch 2    2.0 s"
    )


def test_a_fourth_hyperparameter_reaches_every_table_plot_and_line(study_env, monkeypatch, capsys, tmp_path):
    """Adding weight decay to the space is all it takes: it is a TrainConfig field the model uses."""
    tracker, storage, settings = study_env
    wider = {**SEARCH_SPACE, "weight_decay": FloatDistribution(1e-4, 1e-1, log=True)}
    monkeypatch.setattr(search, "SEARCH_SPACE", wider)
    session = tune(tracker, storage, "wider", n_trials=3, workers=1, **with_base(settings, max_epochs=1))
    trials = session.study.trials
    out = capsys.readouterr().out

    for trial in trials:
        decay = trial.params["weight_decay"]
        assert 1e-4 <= decay <= 1e-1
        # Each trial trained with its own value, and said so in its line.
        assert float(tracker.params(trial.user_attrs[RUN_ATTR])["weight_decay"]) == pytest.approx(decay)
        assert f"trial {trial.number:>3} COMPLETE" in out and f"weight_decay={decay:.2e}" in out
    header = top_trials_table(session.study).splitlines()[0].split()
    assert header[3:7] == ["batch_size", "hidden_dim", "lr", "weight_decay"] and header[0] == "trial"
    assert header[3:7] == out.split("\nstudy 'wider'")[1].splitlines()[1].split()[3:7]  # the summary printed it
    assert "weight_decay=" in out.split("best: trial")[1].splitlines()[0]

    assert top_trials_markdown(session.study).splitlines()[0].split(" | ")[6] == "weight_decay"
    assert list(searched_params(session.study)) == ["batch_size", "hidden_dim", "lr", "weight_decay"]
    rows = groups_markdown(session.study, "weight_decay").splitlines()
    assert rows[0].startswith("| weight_decay | trials |") and len(rows) == 2 + 4
    assert sum(int(row.split("|")[2]) for row in rows[2:]) == len(trials)

    parent = tracker.client.get_run(session.parent_run_id)
    best = min(trials, key=lambda t: t.value)
    assert float(parent.data.tags["best.weight_decay"]) == pytest.approx(best.params["weight_decay"])
    csv = pd.read_csv(tracker.download_artifact(session.parent_run_id, "trials.csv", tmp_path))
    assert "params_weight_decay" in csv.columns

    slices = study_figures(session.study)["slice.png"]
    assert "weight_decay" in {ax.get_xlabel() for ax in slices.axes}


def test_the_groups_of_a_numeric_parameter_hold_every_value_once():
    study = optuna.create_study()
    space = {"hidden_dim": SEARCH_SPACE["hidden_dim"]}  # 32 to 512
    for value in (32, 151, 152, 400, 512):
        trial = optuna.trial.create_trial(
            params={"hidden_dim": value}, distributions=space, value=0.1, user_attrs={"val_acc": 0.9}
        )
        study.add_trial(trial)
    rows = groups_markdown(study, "hidden_dim").splitlines()[2:]
    assert [row.split(" | ")[0].strip("| ") for row in rows] == ["32-151", "152-271", "272-391", "392-512"]
    assert [int(row.split("|")[2]) for row in rows] == [2, 1, 0, 2]
