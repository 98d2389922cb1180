"""The rule that keeps the experiment apart: the machinery never imports the experiment, and
never names a data set, a network or a setting of it beyond what machinery.contract names.
Checked on the source as it is, and shown to catch a machinery module that breaks it."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import shutil
from pathlib import Path

import pytorch_lightning as pl

from conftest import ROOT
from experiment.data import DATASETS
from experiment.networks import NETWORKS
from experiment.search import SEARCH_SPACE
from experiment.settings import Settings

MACHINERY = ROOT / "src" / "machinery"
# What machinery.contract says the machinery may read of the settings.
CONTRACT = {"seed", "max_epochs", "task", "study"}


def experiment_names() -> set[str]:
    """Every name the experiment defines that the contract does not: its settings, the searched
    ones, its registries' keys and classes, the data sets' folders, and its modules' top-level
    names (LitClassifier, MNISTDataModule, SEARCH_SPACE, ...)."""
    import experiment.data
    import experiment.model
    import experiment.networks
    import experiment.pictures
    import experiment.search
    import experiment.trainer

    names = {field.name for field in dataclasses.fields(Settings)} | set(SEARCH_SPACE)
    names |= {name for network in NETWORKS.values() for name in network.search_space}
    names |= set(DATASETS) | {kind.__name__ for kind in DATASETS.values()}
    names |= {kind.folder for kind in DATASETS.values() if hasattr(kind, "folder")}
    names |= set(NETWORKS) | {net.__name__ for net in NETWORKS.values()}
    modules = (experiment.data, experiment.model, experiment.networks, experiment.pictures, experiment.search,
               experiment.trainer)  # fmt: skip
    for module in modules:
        names |= {name for name, value in vars(module).items() if getattr(value, "__module__", None) == module.__name__}
        names |= {name for name, value in vars(module).items() if name.isupper() and not inspect.ismodule(value)}
    # Words of the contract and of plain English that the experiment happens to use as names too,
    # and the names of Lightning's own API (self.log's batch_size is Lightning's word).
    lightning = set(inspect.signature(pl.LightningModule.log).parameters)
    return (
        names
        - CONTRACT
        - lightning
        - {
            "dataset",
            "model",
            "build",
            "objective",
            "search_space",
            "trainer",
            "datasets",
            "EXPERIMENT",
            "setting",
            "Settings",
        }
        - {"folder", "channels", "patience", "resized"}
    )


def violations(folder: Path) -> list[str]:
    """Where the machinery in ``folder`` imports the experiment, reads a setting the contract
    does not name, or names the experiment's data sets, networks or settings."""
    forbidden = experiment_names()
    found = []
    for path in sorted(folder.rglob("*.py")):
        source = path.read_text()
        where = path.relative_to(folder)
        for node in ast.walk(ast.parse(source)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            modules += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{where}:{node.lineno} imports {m}" for m in modules if m.split(".")[0] == "experiment"]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and "settings" in node.value.id:
                if node.attr not in CONTRACT and not node.attr.startswith("_"):
                    found.append(f"{where}:{node.lineno} reads the setting {node.attr}")
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*", source))
        found += [f"{where} names {word}" for word in sorted(words & forbidden)]
        found += [f"{where} names MNIST" for _ in re.findall(r"mnist", source, re.I)[:1]]
    return found


def test_the_machinery_never_names_the_experiment():
    assert violations(MACHINERY) == []


def test_the_rule_catches_a_machinery_module_that_names_it(tmp_path):
    copy = tmp_path / "machinery"
    shutil.copytree(MACHINERY, copy)
    memory = copy / "memory.py"
    memory.write_text(memory.read_text() + "\n\ndef width(settings):\n    return settings.hidden_dim\n")
    line = len(memory.read_text().splitlines())
    assert violations(copy) == [f"memory.py:{line} reads the setting hidden_dim", "memory.py names hidden_dim"]
    memory.write_text(memory.read_text() + "\nfrom experiment.data import MNISTDataModule\n")
    assert "memory.py names MNIST" in violations(copy) and "memory.py names MNISTDataModule" in violations(copy)
    assert any(v.startswith("memory.py:") and v.endswith("imports experiment.data") for v in violations(copy))
