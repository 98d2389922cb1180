"""docs/make-it-yours.md, done as it says: a data set and a network of one's own, in one file
outside the package, registered in one line each, then trained and tuned with the commands the
page gives, without touching any other file."""

from __future__ import annotations

import re
import shlex

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_a_data_set_and_a_network_of_ones_own_train_tune_and_register(run_script, tmp_path):
    page = (ROOT / "docs" / "make-it-yours.md").read_text()
    section = page.split("## Your data, your network")[1].split("\n## ")[0]
    [code] = re.findall(r"```python\n(.*?)```", section, re.S)
    [commands] = re.findall(r"```bash\n(.*?)```", section, re.S)
    (tmp_path / "shapes.py").write_text(code)
    assert code.count('DATASETS["shapes"] = ') == 1 and code.count('NETWORKS["tiny"] = ') == 1
    before = {path: path.read_bytes() for path in (ROOT / "src").rglob("*.py")}

    train, tune = (shlex.split(line) for line in commands.strip().splitlines())
    assert train[:2] == ["python", "scripts/train.py"] and tune[:2] == ["python", "scripts/tune.py"]
    trained = run_script("train.py", *train[2:])
    assert trained.returncode == 0, trained.stderr
    tuned = run_script("tune.py", *tune[2:])
    assert tuned.returncode == 0, tuned.stderr

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("shapes-train").experiment_id])
    params = run.data.params
    assert run.info.status == "FINISHED" and (params["dataset"], params["model"]) == ("shapes", "tiny")
    assert params["data_source"] == "generated" and run.data.metrics["test_acc"] > 0.9  # three classes
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["shapes"] * 3

    study = optuna.load_study(study_name="shapes-tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert "study 'shapes-tiny': 2 trials, 2 complete" in tuned.stdout
    assert "registered as shapes-classifier version 1: now models:/shapes-classifier@champion" in tuned.stdout
    runs = client.search_runs([client.get_experiment_by_name("shapes-tune").experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    version = client.get_model_version_by_alias("shapes-classifier", "champion")
    assert version.tags["dataset"] == "shapes" and version.tags["model"] == "tiny"
    assert {path: path.read_bytes() for path in (ROOT / "src").rglob("*.py")} == before  # nothing else touched
