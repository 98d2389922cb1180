"""The search space: one declaration in the experiment, from which a trial's settings, its
console line, the summary, the README's tables, the CSV, the plots and the study's definition
all follow."""

from __future__ import annotations

import dataclasses
import shutil

import optuna
import pandas as pd
import pytest
from optuna.trial import FixedTrial

from conftest import ROOT, tune_args
from experiment.search import SEARCH_SPACE, objective
from experiment.settings import Settings
from machinery.plots import study_figures
from machinery.report import groups_markdown, searched_params, top_trials_markdown
from machinery.trial import TrialReport


def test_every_searched_name_is_a_setting_of_one_run():
    assert set(SEARCH_SPACE) <= {field.name for field in dataclasses.fields(Settings)}


def test_the_objective_suggests_builds_fits_and_returns_from_a_seed_of_its_own():
    base = Settings(max_epochs=3, val_size=500, seed=10)
    fitted = []

    class Result:
        val_loss = 0.25

    def fit(model, data, settings):
        fitted.append((model, data, settings))
        return Result

    trial = FixedTrial({"batch_size": 128, "hidden_dim": 300, "lr": 3e-3}, number=7)
    assert objective(trial, base, fit) == 0.25
    [(model, data, settings)] = fitted
    assert settings == Settings(batch_size=128, hidden_dim=300, lr=3e-3, max_epochs=3, val_size=500, seed=17)
    assert data.batch_size == 128 and model.hparams.lr == 3e-3 and model.net[1][1].out_features == 300
    with pytest.raises(ValueError, match=r"100.* not in \(32, 64, 128, 256\)"):
        objective(FixedTrial({"batch_size": 100, "hidden_dim": 300, "lr": 3e-3}), base, fit)


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


WIDER = '    "weight_decay": FloatDistribution(1e-4, 1e-1, log=True),\n'


def test_a_fourth_hyperparameter_is_one_line_in_the_space(run_script, call_script, tiny_data, tmp_path):
    """As a user would: one line added to SEARCH_SPACE, in a copy of the experiment, and the
    same command; every table, plot, CSV column and the study's definition follow."""
    copy = tmp_path / "mine"
    shutil.copytree(ROOT / "src" / "experiment", copy / "experiment")
    search = copy / "experiment" / "search.py"
    source = search.read_text()
    assert source.count('    "lr": FloatDistribution(1e-4, 1e-1, log=True),\n') == 1
    search.write_text(source.replace('    "lr": FloatDistribution(1e-4, 1e-1, log=True),\n',
                                     '    "lr": FloatDistribution(1e-4, 1e-1, log=True),\n' + WIDER))  # fmt: skip

    args = tune_args(tiny_data[0], "--n-trials", "3", "--workers", "1", "--max-epochs", "1")
    result = run_script("tune.py", *args, env={"PYTHONPATH": str(copy)})
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="mnist-mlp", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    out = result.stdout
    for trial in study.trials:
        decay = trial.params["weight_decay"]
        assert 1e-4 <= decay <= 1e-1 and trial.user_attrs["settings"]["weight_decay"] == decay  # trained with it
        assert f"trial {trial.number:>3} COMPLETE" in out and f"weight_decay={decay:.2e}" in out
    summary = out.split("\nstudy 'mnist-mlp'")[1].splitlines()
    assert summary[1].split()[3:7] == ["batch_size", "hidden_dim", "lr", "weight_decay"]
    assert "weight_decay=" in out.split("best: trial")[1].splitlines()[0]

    definition = study.user_attrs["definition"]
    assert "weight_decay" in definition["space"] and "weight_decay" not in definition["settings"]
    assert top_trials_markdown(study).splitlines()[0].split(" | ")[6] == "weight_decay"
    assert list(searched_params(study)) == ["batch_size", "hidden_dim", "lr", "weight_decay"]
    rows = groups_markdown(study, "weight_decay").splitlines()
    assert rows[0].startswith("| weight_decay | trials |") and len(rows) == 2 + 4
    assert sum(int(row.split("|")[2]) for row in rows[2:]) == len(study.trials)
    slices = study_figures(study)["slice.png"]
    assert "weight_decay" in {ax.get_xlabel() for ax in slices.axes}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [parent] = client.search_runs(["1"], "tags.`mlflow.runName` = 'mnist-mlp'")
    best = min(study.trials, key=lambda t: t.value)
    assert float(parent.data.tags["best.weight_decay"]) == pytest.approx(best.params["weight_decay"])
    csv = pd.read_csv(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path)))
    assert "params_weight_decay" in csv.columns

    # The study now searches another space: the experiment as shipped may not continue it.
    again = call_script("tune.py", *args)
    assert again.returncode == 2 and "searched another space" in again.stderr and "weight_decay" in again.stderr


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
