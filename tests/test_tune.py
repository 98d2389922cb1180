"""Studies: the session behind scripts/tune.py, on the tiny synthetic data."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import STUDY_EPOCHS
from tunetrack.machinery.study import workers


def runs_of(client: MlflowClient, experiment: str = "tune-tests"):
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def children_and_parents(runs):
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return children, parents


def test_a_study_tracks_every_trial_nested_under_one_parent(study_env, capsys):
    session = study_env("small", n_trials=3)
    tracker = study_env.tracker

    study = optuna.load_study(study_name="small", storage=study_env.storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    children, parents = children_and_parents(runs_of(tracker.client))
    [parent] = parents
    assert parent.info.run_id == session.parent_run_id and parent.info.status == "FINISHED"
    assert len(children) == 3
    by_trial = {int(run.data.tags["optuna.trial"]): run for run in children}
    for trial in study.trials:
        run = by_trial[trial.number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert {k: run.data.params[k] for k in ("batch_size", "width")} == {
            k: str(trial.params[k]) for k in ("batch_size", "width")
        }
        # Each trial trained from a seed of its own, as the objective says, and records it.
        assert trial.user_attrs["settings"]["seed"] == trial.number and run.data.params["seed"] == str(trial.number)
        for name in ("train_loss", "val_loss", "val_acc"):
            assert [m.step for m in tracker.client.get_metric_history(run.info.run_id, name)] == list(
                range(STUDY_EPOCHS)
            )
        # The objective is the best epoch's val_loss, and its other metrics go with it.
        assert trial.value == pytest.approx(run.data.metrics["best_val_loss"])
        assert trial.user_attrs["metrics"]["val_acc"] == pytest.approx(run.data.metrics["best_val_acc"])
        assert trial.user_attrs["metrics"]["params"] == run.data.metrics["params"] > 0
        assert "test_acc" not in run.data.metrics  # the test set is not used for selection

    # The parent: best value, params, test metrics of the best trial, the CSV and Optuna's plots.
    best = min(study.trials, key=lambda t: t.value)
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.value)
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.tags["best.width"] == str(best.params["width"])
    assert parent.data.metrics["test_acc"] == pytest.approx(session.test["test_acc"])
    [output] = parent.outputs.model_outputs  # the tested network, which holds its own test metrics
    logged = tracker.client.get_logged_model(output.model_id)
    assert {m.key: m.value for m in logged.metrics}["test_acc"] == pytest.approx(session.test["test_acc"])
    assert logged.tags["tested_trial"] == str(best.number)
    assert parent.data.params["sampler"] == "tpe" and parent.data.params["pruner"] == "median"
    artifacts = {a.path for a in tracker.client.list_artifacts(parent.info.run_id)}
    assert "trials.csv" in artifacts
    plots = {a.path for a in tracker.client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/optimization_history.png", "plots/param_importances.png", "plots/slice.png"}

    out = capsys.readouterr().out
    for trial in study.trials:
        assert f"trial {trial.number:>3} COMPLETE" in out
    assert f"best: trial {best.number}" in out and "test_acc" in out and "look at it: mlflow" in out


def test_a_pruned_trial_is_pruned_in_optuna_and_not_failed_in_mlflow(study_env, monkeypatch):
    always = optuna.pruners.ThresholdPruner(upper=-1.0)  # every val_loss is above -1: prune at once
    monkeypatch.setattr(workers, "make_pruner", lambda *args: always)  # one worker: this process
    study_env("pruned", n_trials=2, max_epochs=3)
    study = optuna.load_study(study_name="pruned", storage=study_env.storage)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert all(len(t.intermediate_values) == 1 for t in study.trials)
    children, [parent] = children_and_parents(runs_of(study_env.tracker.client))
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "PRUNED"
        assert run.data.tags["pruned"].startswith("pruned after epoch 1 ")  # counted from 1: it ran one
    assert parent.info.status == "FINISHED" and "test_acc" not in parent.data.metrics


@pytest.mark.filterwarnings("ignore:Fixed parameter lr with value")
@pytest.mark.parametrize(
    ("lr", "said"),
    [
        (1e20, "pruned after epoch 1: val_loss is nan: training diverged"),
        # 13 steps an epoch: judged by the first epoch of 50 steps, the fourth.
        (3.0, "pruned after epoch 4: val_loss {loss} is no better than chance (1.3863, guessing every class alike)"),
    ],
)
def test_a_diverging_trial_is_pruned_early_whatever_the_pruner(study_env, capsys, lr, said):
    study = optuna.create_study(study_name="diverged", storage=study_env.storage)
    study.enqueue_trial({"batch_size": 32, "width": 16, "lr": lr})  # far above the space's 0.3
    study.enqueue_trial({"batch_size": 32, "width": 16, "lr": 0.05})
    study_env("diverged", n_trials=2, max_epochs=6)
    diverged, complete = optuna.load_study(study_name="diverged", storage=study_env.storage).trials
    run = study_env.tracker.client.get_run(diverged.user_attrs["mlflow_run_id"])
    losses = study_env.tracker.metric_history(run.info.run_id, "val_loss")
    said = said.format(loss=f"{losses[-1]:.4f}")
    assert diverged.state == TrialState.PRUNED and diverged.user_attrs["pruned"] == said
    assert len(losses) == (1 if lr > 1e10 else 4)
    assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "PRUNED"
    assert complete.state == TrialState.COMPLETE
    assert f"trial   0 PRUNED   batch_size=32 lr={lr:.2e} width=16  {said}" in capsys.readouterr().out


def test_running_again_continues_the_study_under_the_same_parent(study_env):
    first = study_env("again", n_trials=2)
    second = study_env("again", n_trials=2)
    assert optuna.study.get_all_study_names(study_env.storage) == ["again"]
    study = optuna.load_study(study_name="again", storage=study_env.storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert second.parent_run_id == first.parent_run_id
    children, parents = children_and_parents(runs_of(study_env.tracker.client))
    assert len(parents) == 1 and len(children) == 4 and parents[0].info.status == "FINISHED"
    # The continued session did not replay the first one's proposals.
    assert study.trials[2].params != study.trials[0].params


def test_one_worker_and_the_same_seed_replay_the_same_study(study_env):
    for name in ("replay-a", "replay-b"):
        study_env(name, n_trials=3, seed=11)
    a, b = (optuna.load_study(study_name=name, storage=study_env.storage).trials for name in ("replay-a", "replay-b"))
    assert [t.params for t in a] == [t.params for t in b]
    assert [t.value for t in a] == [t.value for t in b]


@pytest.mark.parametrize(
    ("sampler", "pruner"), [("tpe", "hyperband"), ("tpe", "halving"), ("gp", "median"), ("random", "median")]
)
def test_every_sampler_and_pruner_runs_a_study_and_is_recorded(study_env, sampler, pruner):
    session = study_env(f"{sampler}-{pruner}", n_trials=2, options={"sampler": sampler, "pruner": pruner})
    assert {t.state for t in session.study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert len(session.study.trials) == 2
    definition = session.study.user_attrs["definition"]["search"]
    assert definition == {"sampler": sampler, "pruner": pruner}
    parent = study_env.tracker.client.get_run(session.parent_run_id)
    assert (parent.data.params["sampler"], parent.data.params["pruner"]) == (sampler, pruner)


def test_a_network_searches_its_own_hyperparameters_and_no_other_networks_study_sees_them(study_env):
    """The conv network's kernel is searched in conv studies only: a dense study's definition,
    trials and parent run never name it, and stays as it was when conv's space grows."""
    dense = study_env("dense", n_trials=2)
    conv = study_env("conv", n_trials=2, model="conv")
    assert all(set(t.params) == {"batch_size", "lr", "width"} for t in dense.study.trials)
    assert all(set(t.params) == {"batch_size", "lr", "width", "kernel"} for t in conv.study.trials)
    assert "kernel" in conv.study.user_attrs["definition"]["space"]
    assert "kernel" not in dense.study.user_attrs["definition"]["space"]
    assert all(t.user_attrs["settings"]["kernel"] == t.params["kernel"] for t in conv.study.trials)  # trained with it


@pytest.mark.filterwarnings("ignore:Fixed parameter lr with value")
def test_a_trial_stopped_early_says_so_on_its_line(study_env, capsys):
    study = optuna.create_study(study_name="early", storage=study_env.storage)
    study.enqueue_trial({"batch_size": 16, "width": 16, "lr": 1.0})  # no better after its first epoch
    session = study_env("early", n_trials=1, max_epochs=20, patience=1, options={"pruning": False})
    [trial] = session.study.trials
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["best_epoch"] < 18
    said = trial.user_attrs["stopped_early"]
    assert said.startswith("stopped early after ")
    assert said.endswith(f"of 20 epochs (best epoch {trial.user_attrs['best_epoch'] + 1})")
    assert f"val_acc {trial.user_attrs['metrics']['val_acc']:.4f} {said}" in capsys.readouterr().out


def test_the_summary_names_the_best_trial_exactly_and_how_to_train_it_again(study_env, capsys):
    session = study_env("summary", n_trials=2)
    best = min(session.study.trials, key=lambda t: t.value)
    out = capsys.readouterr().out
    params = ", ".join(f"{name}={value!r}" for name, value in best.params.items())
    assert f"best: trial {best.number} ({params}; seed {best.number}): val_loss" in out
    assert f"train it again: python scripts/train.py --from-trial summary:{best.number} --storage sqlite:///" in out


def test_every_run_has_system_metrics_and_the_parent_where_the_studys_time_went(study_env, capsys):
    """MLflow's system metrics in every run (once an epoch in a trial's), each trial's time by
    phase, and the session's split in its parent run, adding up: each second counted once."""
    session = study_env("timed", n_trials=3, options={"workers": 2, "baseline": "linear", "pruning": False})
    client = study_env.tracker.client
    children, [parent] = children_and_parents(runs_of(client))
    trials = [run for run in children if "optuna.trial" in run.data.tags]
    assert len(trials) == 3 and len(children) == 4  # and the baseline's
    for run in [*children, parent]:
        assert 0 <= run.data.metrics["system/cpu_utilization_percentage"] <= 100, run.info.run_name
        assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    for run in trials:
        history = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
        assert sorted(m.step for m in history) == list(range(STUDY_EPOCHS))  # once an epoch
        phases = [run.data.metrics[f"time_{phase}_s"] for phase in ("set_up", "training", "validation", "tracking")]
        assert min(phases) >= 0 and run.data.metrics["time_training_s"] > 0
        assert sum(phases) == pytest.approx(run.data.metrics["time_fit_s"], abs=0.01)  # none counted twice

    split = {name[len("time_") : -len("_s")]: v for name, v in parent.data.metrics.items() if name.startswith("time_")}
    inside = sum(split[f"trials_{part}"] for part in ("training", "validation", "tracking", "set_up", "idle"))
    ran = sum((run.info.end_time - run.info.start_time) / 1000 for run in trials)
    assert split["trials_idle"] == pytest.approx(max(0.0, 2 * split["trials"] - ran), abs=0.01)
    assert inside == pytest.approx(max(2 * split["trials"], ran), abs=0.01)  # the workers' time, all of it
    assert split["trials_training"] == pytest.approx(sum(r.data.metrics["time_training_s"] for r in trials), abs=0.01)
    after = sum(split[part] for part in ("start_up", "trials", "summary", "baseline", "test", "registration", "other"))
    assert after == pytest.approx(split["study"], abs=0.01) and split["baseline"] > 0 and split["test"] > 0
    assert session.parent_run_id == parent.info.run_id
    [said] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("time: ")]
    assert f"trials {split['trials']:.1f} s on 2 worker(s) (training {split['trials_training']:.1f} s" in said
