"""docs/make-it-yours.md, done as it says: a data set and a network of one's own in one file
outside the package; then, in a copy of the repository, the page's edits of src/tunetrack/experiment (a
network's own searched hyperparameter, another of the training's, a Trainer callback) with a
folder of pictures, after which a study started before the edits continues, the edited
network searches its own hyperparameter, and the copy's fast tests still pass."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import ROOT, call_command
from tunetrack.experiment.settings import Settings

pytestmark = pytest.mark.slow

PAGE = (ROOT / "docs" / "make-it-yours.md").read_text()


def test_a_data_set_and_a_network_of_ones_own_train_tune_and_register(tmp_path):
    section = PAGE.split("## Your data, your network")[1].split("\n## ")[0]
    [code] = re.findall(r"```python\n(.*?)```", section, re.S)
    [commands] = re.findall(r"```bash\n(.*?)```", section, re.S)
    (tmp_path / "shapes.py").write_text(code)
    assert code.count('DATASETS["shapes"] = ') == 1 and code.count('NETWORKS["tiny"] = ') == 1
    before = {path: path.read_bytes() for path in (ROOT / "src").rglob("*.py")}

    train, tune = (shlex.split(line) for line in commands.strip().splitlines())
    assert train[:2] == ["python", "scripts/train.py"] and tune[:2] == ["python", "scripts/tune.py"]
    trained = run(ROOT, "train.py", *train[2:], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    tuned = run(ROOT, "tune.py", *tune[2:], cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run_] = client.search_runs([client.get_experiment_by_name("shapes-train").experiment_id])
    params = run_.data.params
    assert run_.info.status == "FINISHED" and (params["dataset"], params["model"]) == ("shapes", "tiny")
    assert params["data_source"] == "generated" and run_.data.metrics["test_acc"] > 0.9  # three classes
    assert [d.dataset.name for d in run_.inputs.dataset_inputs] == ["shapes"] * 3

    study = optuna.load_study(study_name="shapes-tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert all(set(t.params) == {"batch_size", "lr", "hidden_dim"} for t in study.trials)
    assert "study 'shapes-tiny': 2 trials, 2 complete" in tuned.stdout
    assert "registered as shapes-classifier version 1: now models:/shapes-classifier@champion" in tuned.stdout
    runs = client.search_runs([client.get_experiment_by_name("shapes-tune").experiment_id])
    kinds = [next((k for k in ("optuna.trial", "repeat_of", "baseline") if k in r.data.tags), "study") for r in runs]
    # The study's run, its two trials, each trained twice more (a small data set), and its baseline.
    assert sorted(kinds) == ["baseline", "optuna.trial", "optuna.trial", *["repeat_of"] * 4, "study"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    version = client.get_model_version_by_alias("shapes-classifier", "champion")
    assert version.tags["dataset"] == "shapes" and version.tags["model"] == "tiny"
    assert {path: path.read_bytes() for path in (ROOT / "src").rglob("*.py")} == before  # nothing else touched


HIDDEN_DIM = (
    "    hidden_dim: int = setting(128, \"hidden units (the MLP's hidden layer, the CNN's fully connected one)\")\n"
)
# Each edit the page shows: (file, what is there, what the page shows in its place). The page
# must show each new text as it is here.
EDITS = [
    (
        "src/tunetrack/experiment/settings.py",
        HIDDEN_DIM,
        HIDDEN_DIM
        + '    dropout: float = setting(0.0, "the CNN\'s dropout before its last layer", minimum=0, maximum=0.9)\n',
    ),
    (
        "src/tunetrack/experiment/networks.py:CNN",
        '        "lr": FloatDistribution(1e-4, 1e-2, log=True),\n',
        '        "lr": FloatDistribution(1e-4, 1e-2, log=True),\n        "dropout": FloatDistribution(0.0, 0.5),\n',
    ),
    (
        "src/tunetrack/experiment/networks.py:CNN",
        "    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden_dim: int):\n",
        "    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden_dim: int, dropout: float):\n",
    ),
    (
        "src/tunetrack/experiment/networks.py:CNN",
        "            nn.Linear(hidden_dim, num_classes),\n",
        "            nn.Dropout(dropout),\n            nn.Linear(hidden_dim, num_classes),\n",
    ),
    (
        "src/tunetrack/experiment/search.py",
        '    "lr": FloatDistribution(1e-4, 1e-1, log=True),\n}\n',
        '    "lr": FloatDistribution(1e-4, 1e-1, log=True),\n'
        '    "weight_decay": FloatDistribution(1e-4, 1e-1, log=True),\n}\n',
    ),
    (
        "src/tunetrack/experiment/trainer.py",
        '    return {"callbacks": callbacks, "gradient_clip_val": settings.gradient_clip}\n',
        '    callbacks.append(LearningRateMonitor(logging_interval="epoch"))  # the lr\'s curve, in MLflow\n'
        '    return {"callbacks": callbacks, "gradient_clip_val": settings.gradient_clip}\n',
    ),
    (
        "src/tunetrack/experiment/trainer.py",
        "from pytorch_lightning.callbacks import EarlyStopping\n",
        "from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor\n",
    ),
]


def added(old: str, new: str) -> str:
    """What an edit adds: the lines before or after what was there, or all of it."""
    return new[len(old) :] if new.startswith(old) else new[: -len(old)] if new.endswith(old) else new


SHOWN = [added(old, new) for _, old, new in EDITS if "import" not in new]  # the page names the imports in words
# The edit that changes what every study searches: a study begun before it is another study's.
SPACE_OF_THE_TRAINING = [edit for edit in EDITS if edit[0] == "src/tunetrack/experiment/search.py"]


def make_edits(copy: Path, edits: list) -> None:
    for where, old, new in edits:
        path, _, cls = where.partition(":")
        source = (copy / path).read_text()
        start = source.index(f"class {cls}(") if cls else 0
        end = source.find("\nclass ", start + 1) if cls else len(source)
        end = len(source) if end < 0 else end
        part = source[start:end]
        assert part.count(old) == 1, f"{where}: the page's edit no longer finds {old!r}"
        (copy / path).write_text(source[:start] + part.replace(old, new) + source[end:])


def run(root: Path, script: str, *args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(root / "scripts" / script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


def some_pictures(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for c, name in enumerate(("circle", "square", "triangle")):
        (root / name).mkdir(parents=True)
        for i in range(30):
            pixels = rng.normal(100, 25, (24, 24, 3))
            pixels[6:18, 6:18, c] += 120
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_the_pages_edits_keep_every_study_and_test_as_they_were(tmp_path):
    for shown in SHOWN:
        assert shown.strip() in PAGE, f"docs/make-it-yours.md no longer shows:\n{shown}"
    pictures = some_pictures(tmp_path / "shapes")
    work = tmp_path / "work"
    work.mkdir()
    study = ["--dataset", "folder", "--data-dir", pictures, "--workers", "1", "--max-epochs", "2"]
    # An MLP study, as the repository was (the repository's own tune.py, run in this process).
    before = call_command(ROOT / "scripts" / "tune.py", Settings, "tunetrack.experiment.search:EXPERIMENT", *study,
                          "--n-trials", "1", cwd=work)  # fmt: skip
    assert before.returncode == 0, before.stderr

    copy = tmp_path / "copy"
    caches = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "mlruns", "*.db")

    def ignored(folder: str, names: list[str]) -> set[str]:  # the data sets, not the machinery's data/
        return caches(folder, names) | ({"data"} if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, copy, ignore=ignored)
    make_edits(copy, [edit for edit in EDITS if edit not in SPACE_OF_THE_TRAINING])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy / "src"), os.environ.get("PYTHONPATH", "")])}

    # The MLP study goes on; a CNN study searches dropout, and the callback logs the lr's curve.
    again = run(copy, "tune.py", *study, "--n-trials", "1", cwd=work, env=env)
    assert again.returncode == 0, again.stderr
    assert "continuing sqlite:///optuna.db, study 'shapes-mlp': 1 trials so far" in again.stdout
    cnn = run(copy, "tune.py", *study, "--n-trials", "2", "--model", "cnn", cwd=work, env=env)
    assert cnn.returncode == 0, cnn.stderr
    storage = f"sqlite:///{work / 'optuna.db'}"
    mlp_trials = optuna.load_study(study_name="shapes-mlp", storage=storage).trials
    cnn_trials = optuna.load_study(study_name="shapes-cnn", storage=storage).trials
    assert [set(t.params) for t in mlp_trials] == [{"batch_size", "lr", "hidden_dim"}] * 2
    assert [set(t.params) for t in cnn_trials] == [{"batch_size", "lr", "hidden_dim", "dropout"}] * 2
    assert all(t.user_attrs["settings"]["dropout"] == t.params["dropout"] for t in cnn_trials)  # trained with it
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run_id = cnn_trials[0].user_attrs["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "lr-AdamW")] == [0, 1]  # the callback's curve

    # Every edit of the page made, the fast tests of src/tunetrack/experiment pass in the copy. The
    # machinery's never import it (they train tests/tiny): running them there would show nothing.
    make_edits(copy, SPACE_OF_THE_TRAINING)
    reading = [path.name for path in sorted((ROOT / "tests").rglob("test_*.py"))
               if re.search(r"^\s*(from|import) tunetrack\.experiment\b", path.read_text(), re.M)]  # fmt: skip
    assert "test_experiment.py" in reading and "test_train.py" not in reading
    command = [sys.executable, "-m", "pytest", "-m", "not slow", "-q", "-p", "no:cacheprovider"]
    fast = subprocess.run([*command, *(f"tests/{name}" for name in reading)], capture_output=True, text=True,
                          cwd=copy, env=env, timeout=1200)  # fmt: skip
    said = [line for line in fast.stdout.splitlines() if "FAIL" in line or "Error" in line]
    assert fast.returncode == 0, "\n".join(said)
