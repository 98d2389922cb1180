"""What a study optimizes, and a champion chosen honestly: any metric the LightningModule logs,
in its direction, or two of them; the best trials trained again so that the best is chosen by a
mean and the champion moves only beyond the noise; and a baseline that needs no tuning beside
the best."""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import statistics

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.study import StudyDirection
from optuna.trial import TrialState

from conftest import ROOT, TINY, assert_flag_error, call_command, tune_args
from tiny import experiment as tiny
from tunetrack.experiment.settings import Settings
from tunetrack.machinery.objectives import Objective, ObjectiveError
from tunetrack.machinery.study import plots
from tunetrack.machinery.tracking import registry
from workbench.digits import export_digits

CHAMPION = "models:/blocks-classifier@champion"


def runs_of(client: MlflowClient, experiment: str = "tune-tests"):
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_a_study_of_val_acc_maximizes_it_and_every_line_table_plot_and_csv_names_it(
    study_env, capsys, monkeypatch, tmp_path
):
    labels = []
    figures = plots.study_figures
    monkeypatch.setattr(plots, "study_figures", lambda *a: labels.append(found := figures(*a)) or found)
    session = study_env("acc", n_trials=3, options={"objective": "val_acc"})
    study, tracker, out = session.study, study_env.tracker, capsys.readouterr().out
    assert study.direction == StudyDirection.MAXIMIZE and study.metric_names == ["val_acc"]
    assert study.user_attrs["definition"]["objective"] == [["val_acc", "maximize"]]
    for trial in study.trials:
        run = tracker.client.get_run(trial.user_attrs["mlflow_run_id"])
        curve = [m.value for m in tracker.client.get_metric_history(run.info.run_id, "val_acc")]
        # Its value is its best epoch's val_acc: the highest of its curve, the first epoch on a tie.
        assert trial.value == run.data.metrics["best_val_acc"] == max(curve)
        assert run.data.metrics["best_epoch"] == curve.index(max(curve))
        assert f"trial {trial.number:>3} COMPLETE" in out and f"val_acc {trial.value:.4f} val_loss " in out
    summary = out.split("\nstudy 'acc'")[1].splitlines()
    assert summary[1].split()[:3] == ["trial", "val_acc", "val_loss"]
    best = max(study.trials, key=lambda t: (t.value, -t.number))
    assert f"best: trial {best.number} (" in out and f"): val_acc {best.value:.4f}, val_loss" in out
    parent = tracker.client.get_run(session.parent_run_id)
    assert parent.data.metrics["best_val_acc"] == best.value and parent.data.params["objective"] == "val_acc (maximize)"
    with open(tracker.client.download_artifacts(session.parent_run_id, "trials.csv", str(tmp_path))) as f:
        header = next(csv.reader(f))
    assert "value_val_acc" in header and "val_loss" in header and "val_acc" in header
    [figures_made] = labels
    assert figures_made["optimization_history.png"].axes[0].get_ylabel() == "val_acc at the best epoch"
    assert "val_acc" in figures_made["slice.png"]._suptitle.get_text()


def test_continuing_a_study_under_another_objective_is_refused_in_one_line(call_script, tiny_data, tmp_path):
    args = tune_args(tiny_data, "--n-trials", "1", "--study-name", "acc", "--objective", "val_acc")
    first = call_script("tune.py", *args)
    assert first.returncode == 0, first.stderr
    for other, said in ((("--objective", "val_loss"), "optimizes val_acc (maximize), not val_loss (minimize)"),
                        ((), "optimizes val_acc (maximize), not val_loss (minimize)")):  # fmt: skip
        refused = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--study-name", "acc", *other))
        assert_flag_error(refused, "tune.py", "--objective")
        assert said in refused.stderr and "continue it with --objective val_acc" in refused.stderr
    assert len(optuna.load_study(study_name="acc", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials) == 1


@pytest.mark.parametrize(
    ("args", "flag", "said"),
    [
        (("--objective", "val_auc"), "--objective", "a metric of your LightningModule's own needs its direction"),
        (("--objective", "val_loss", "--direction", "maximize"), "--direction", "val_loss is better lower"),
        (("--objective", "val_acc,val_acc"), "--objective", "two different ones"),
        (("--objective", "params"), "--objective", "go beside a metric the LightningModule logs"),
        (("--objective", "val_acc", "--direction", "up"), "--direction", "expected minimize or maximize"),
        (("--objective", "val_acc,params", "--repeats", "2"), "--repeats", "a study of two objectives"),
    ],
)
def test_an_objective_that_cannot_be_used_is_one_line_naming_its_flag(call_script, tiny_data, args, flag, said):
    result = call_script("tune.py", "--data-dir", str(tiny_data), *args)
    assert_flag_error(result, "tune.py", flag)
    assert said in result.stderr


def test_a_metric_of_ones_own_is_optimized_in_the_direction_given_and_one_not_logged_is_said(
    call_script, tiny_data, tmp_path
):
    result = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--objective", "val_auc",
                                               "--direction", "maximize"))  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        "the LightningModule logged no val_auc in its validation epoch (it logged val_loss, val_acc)" in result.stderr
    )
    assert Objective.parse("val_auc", "maximize", TINY.metrics).directions == ("maximize",)
    with pytest.raises(ObjectiveError):
        Objective.parse("val_auc", None, TINY.metrics)


def test_an_objective_that_returns_another_number_than_its_objectives_is_refused(
    call_script, tiny_data, tmp_path, monkeypatch
):
    """The edit a user would try first, to maximize val_acc: return its negative. The number would
    be compared, pruned and registered under the name val_loss; it is refused, and nothing is
    registered."""

    def negated(trial, settings, run):
        tiny.objective(trial, settings, run)
        return -run.result.metrics["val_acc"]

    monkeypatch.setattr(tiny, "EXPERIMENT", dataclasses.replace(TINY, objective=negated))
    result = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "2", "--workers", "1"))
    [line] = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.match(r"tune\.py: error: ObjectiveMismatch: the experiment's objective returned -[01]\.\d{4}, not its "
                    r"best epoch's val_loss \(\d\.\d{4}\): it returns run\.value", line), line  # fmt: skip
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_registered_models() == []


def test_a_champion_of_val_loss_stays_before_a_weaker_study_of_val_acc_and_a_stronger_one_moves_it(
    call_script, tiny_data, tmp_path
):
    """The user's sequence: a champion registered by a val_loss study, then studies under
    --objective val_acc. The champion is measured on each challenger's validation data under
    val_acc; a number is never compared under another's name."""

    def study(name: str, *args: str) -> str:
        result = call_script("tune.py", *tune_args(tiny_data, "--n-trials", "1", "--study-name", name, *args))
        assert result.returncode == 0, result.stderr
        return next(line for line in result.stdout.splitlines() if "blocks-classifier" in line)

    one_epoch = ("--batch-size", "64", "--width", "4", "--lr", "0.02", "--max-epochs", "1")
    assert study("loss", *one_epoch).endswith(f"now {CHAMPION} (the best so far)")
    weaker = study("weaker", *one_epoch, "--model", "conv", "--kernel", "3", "--objective", "val_acc")
    assert weaker == (
        f"registered as blocks-classifier version 2; {CHAMPION} stays version 1, whose val_acc on this one's "
        "validation data, 0.6000, is no lower"
    )
    stronger = study("stronger", "--batch-size", "32", "--width", "16", "--lr", "0.05", "--objective", "val_acc")
    assert stronger.startswith(f"registered as blocks-classifier version 3: now {CHAMPION} (the best so far, was "
                               "version 1, chosen on other data or by another objective and measured on this one's: "
                               "val_acc 1.0000 against 0.6000")  # fmt: skip
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    versions = {int(v.version): v.tags for v in client.search_model_versions("name = 'blocks-classifier'")}
    assert [versions[v]["objective"] for v in (1, 2, 3)] == ["val_loss", "val_acc", "val_acc"]
    assert [versions[v]["direction"] for v in (1, 2, 3)] == ["minimize", "maximize", "maximize"]
    assert int(client.get_model_version_by_alias("blocks-classifier", "champion").version) == 3


def test_a_study_of_two_objectives_prints_its_pareto_front_and_registers_its_best_on_the_first(study_env, capsys):
    session = study_env("two", n_trials=5, options={"objective": "val_acc,params"}, max_epochs=1)
    study, out = session.study, capsys.readouterr().out
    assert study.directions == [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]
    assert study.metric_names == ["val_acc", "params"]
    assert "pruning is off: Optuna prunes no study of two objectives" in out
    front = sorted(study.best_trials, key=lambda t: (-t.values[0], t.number))
    assert f"Pareto front of val_acc (maximize), params (minimize): the {len(front)} trials" in out
    table = out.split("Pareto front of")[1].splitlines()[1 : 2 + len(front)]
    assert table[0].split()[:4] == ["trial", "val_acc", "params", "val_loss"]
    assert [int(row.split()[0]) for row in table[1:]] == [t.number for t in front]
    assert f"best: trial {front[0].number} (the front's best on the first objective; " in out
    tags = study_env.tracker.client.get_model_version_by_alias("blocks-classifier", "champion").tags
    assert (tags["trial"], tags["objective"], tags["val_acc"]) == (str(front[0].number), "val_acc",
                                                                  repr(front[0].values[0]))  # fmt: skip
    plots_logged = {a.path for a in study_env.tracker.client.list_artifacts(session.parent_run_id, "plots")}
    assert "plots/pareto_front.png" in plots_logged
    for trial in study.trials:  # every run measured both
        metrics = study_env.tracker.client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics
        assert metrics["params"] == trial.values[1] and metrics["latency_ms"] > 0


# The best trials trained again, on a small folder of real pictures.


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return export_digits(tmp_path_factory.mktemp("digits") / "digits", count=600)


def tune_digits(folder, *args):
    fixed = ("--batch-size", "32", "--lr", "0.003", "--hidden-dim", "64")  # every searched setting: seeds alone differ
    return call_command(ROOT / "scripts" / "tune.py", Settings, "tunetrack.experiment.search:EXPERIMENT",
                        "--dataset", "folder", "--data-dir", folder, "--workers", "1", "--max-epochs", "3",
                        "--baseline", "none", *fixed, *args)  # fmt: skip


def test_repeats_choose_the_best_by_its_mean_and_a_champion_yields_only_beyond_the_noise(digits, tmp_path):
    first = tune_digits(digits, "--n-trials", "2", "--repeats", "3", "--repeat-best", "2")
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert "repeats: the best 2 trials trained 3 more times each, with new seeds" in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = next(r for r in runs_of(client, "digits-tune") if "mlflow.parentRunId" not in r.data.tags)
    repeats = [r for r in runs_of(client, "digits-tune") if "repeat_of" in r.data.tags]
    assert len(repeats) == 2 * 3 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in repeats)
    study = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    means = {}
    for trial in study.trials:
        values = [trial.value] + [r.data.metrics["best_val_loss"] for r in repeats
                                  if r.data.tags["repeat_of"] == str(trial.number)]  # fmt: skip
        means[trial.number] = statistics.fmean(values), statistics.stdev(values) / math.sqrt(4)
        assert (
            f"trial {trial.number}: val_loss {means[trial.number][0]:.4f} ± {means[trial.number][1]:.4f} (4 runs)"
            in out
        )
        # Each repeat validated on a split of its own: the data each run saw says so.
    splits = {
        [d.dataset.digest for d in r.inputs.dataset_inputs if d.tags[0].value == "validation"][0] for r in repeats
    }
    assert len(splits) == 3
    chosen = min(means, key=lambda n: means[n][0])
    assert f"best: trial {chosen} (" in out
    version = client.get_model_version_by_alias("digits-classifier", "champion")
    assert version.tags["trial"] == str(chosen) and version.tags["repeats"] == "3"
    assert float(version.tags["val_loss_mean"]) == pytest.approx(means[chosen][0])
    assert float(version.tags["val_loss_sem"]) == pytest.approx(means[chosen][1])

    # The same study again, but for its seed: a champion as good, by chance a little better or
    # worse. Small data: two repeats by default.
    again = tune_digits(digits, "--n-trials", "2", "--study-name", "reseeded", "--seed", "100")
    assert again.returncode == 0, again.stderr
    assert "repeats: the best 2 trials trained 2 more times each" in again.stdout
    [line] = [line for line in again.stdout.splitlines() if "digits-classifier" in line]
    assert line.startswith("registered as digits-classifier version 2; models:/digits-classifier@champion stays "
                           "version 1"), line  # fmt: skip
    assert int(client.get_model_version_by_alias("digits-classifier", "champion").version) == 1


def test_the_noise_margin_counts_a_single_run_as_noisy_as_one_run_of_the_other():
    repeated = registry.Score("val_acc", "maximize", 0.90, mean=0.91, sem=0.01, runs=4)
    single = registry.Score("val_acc", "maximize", 0.93)
    assert registry.margin(repeated, single) == pytest.approx(math.sqrt(0.01**2 + (0.01 * 2) ** 2))
    assert registry.margin(single, registry.Score("val_acc", "maximize", 0.5)) == 0  # neither measured: values decide
    assert registry.gain(single, repeated) == pytest.approx(0.02)
    tags = repeated.tags()
    assert tags == {"objective": "val_acc", "direction": "maximize", "val_acc": "0.9", "val_acc_mean": "0.91",
                    "val_acc_sem": "0.01", "repeats": "3"}  # fmt: skip
    assert registry.Score.of(tags) == repeated
    assert registry.Score.of({"val_loss": "0.25"}) == registry.Score("val_loss", "minimize", 0.25)  # from before


# The baseline.


def test_every_study_prints_and_logs_a_linear_baseline_that_is_scikit_learns_own(study_env, tiny_settings, capsys):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, log_loss
    from sklearn.preprocessing import StandardScaler

    session = study_env("reference", n_trials=1, options={"baseline": "svc"})
    out = capsys.readouterr().out
    [linear, svc] = session.baselines
    m = linear.metrics
    assert (f"linear baseline ({linear.seconds:.2g} s): val_loss {m['val_loss']:.4f}, val_acc {m['val_acc']:.4f}; "
            f"test_loss {m['test_loss']:.4f}, test_acc {m['test_acc']:.4f}") in out  # fmt: skip
    assert f"svc baseline ({svc.seconds:.2g} s): val_loss {svc.metrics['val_loss']:.4f}, val_acc " in out
    runs = {r.data.tags.get("baseline"): r for r in runs_of(study_env.tracker.client)}
    assert runs["linear"].data.tags["mlflow.parentRunId"] == session.parent_run_id
    logged = {name: value for name, value in runs["linear"].data.metrics.items() if not name.startswith("system/")}
    assert logged == pytest.approx(linear.metrics)  # and the machine's system metrics (test_tune.py)

    _, data = tiny.build(tiny_settings)
    data.setup("fit")

    def rows(split):
        images, labels = data.splits[split]
        return images.reshape(len(labels), -1).double().numpy() / 255, labels.numpy()

    (x, y), (val_x, val_y) = rows("train"), rows("val")
    scaler = StandardScaler().fit(x)
    own = LogisticRegression(max_iter=1_000).fit(scaler.transform(x), y)
    probabilities = own.predict_proba(scaler.transform(val_x))
    assert linear.metrics["val_loss"] == pytest.approx(log_loss(val_y, probabilities), abs=1e-3)
    assert linear.metrics["val_acc"] == pytest.approx(accuracy_score(val_y, probabilities.argmax(1)), abs=0.011)
    assert linear.metrics["params"] == own.coef_.size + own.intercept_.size == x.shape[1] * 4 + 4
    assert np.isfinite(linear.metrics["latency_ms"])


def test_a_continued_study_reuses_its_baseline(study_env, capsys):
    first = study_env("again", n_trials=1, options={"baseline": "linear"})
    second = study_env("again", n_trials=1, options={"baseline": "linear"})
    assert first.baselines[0].run_id == second.baselines[0].run_id
    assert sum(r.data.tags.get("baseline") == "linear" for r in runs_of(study_env.tracker.client)) == 1
    assert study_env("none", n_trials=1, options={"baseline": "none"}).baselines == []
    assert TrialState.COMPLETE in {t.state for t in first.study.trials}
