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
from tunetrack.experiment.data import DATASETS
from tunetrack.experiment.networks import NETWORKS
from tunetrack.experiment.search import SEARCH_SPACE
from tunetrack.experiment.settings import Settings

MACHINERY = ROOT / "src" / "tunetrack" / "machinery"
# What machinery.contract says the machinery may read of the settings.
CONTRACT = {"seed", "max_epochs", "task", "study", "split_seed"}


def experiment_names() -> set[str]:
    """Every name the experiment defines that the contract does not: its settings, the searched
    ones, its registries' keys and classes, the data sets' folders, and its modules' top-level
    names (LitClassifier, MNISTDataModule, SEARCH_SPACE, ...)."""
    from tunetrack import experiment
    from tunetrack.experiment import data, model, networks, search, trainer  # noqa: F401

    names = {field.name for field in dataclasses.fields(Settings)} | set(SEARCH_SPACE)
    names |= {name for network in NETWORKS.values() for name in network.search_space}
    names |= set(DATASETS) | {kind.__name__ for kind in DATASETS.values()}
    names |= {kind.folder for kind in DATASETS.values() if hasattr(kind, "folder")}
    names |= set(NETWORKS) | {net.__name__ for net in NETWORKS.values()}
    modules = (experiment.data, experiment.model, experiment.networks, experiment.search, experiment.trainer)
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
            found += [f"{where}:{node.lineno} imports {m}" for m in modules if "experiment" in m.split(".")[:2]]
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
    memory = copy / "runtime" / "memory.py"
    memory.write_text(memory.read_text() + "\n\ndef width(settings):\n    return settings.hidden_dim\n")
    line = len(memory.read_text().splitlines())
    assert violations(copy) == [
        f"runtime/memory.py:{line} reads the setting hidden_dim",
        "runtime/memory.py names hidden_dim",
    ]
    memory.write_text(memory.read_text() + "\nfrom tunetrack.experiment.data import MNISTDataModule\n")
    found = violations(copy)
    assert "runtime/memory.py names MNIST" in found and "runtime/memory.py names MNISTDataModule" in found
    assert any(v.startswith("runtime/memory.py:") and v.endswith("imports tunetrack.experiment.data") for v in found)


def import_graph(folder: Path, package: str) -> dict[str, set[str]]:
    """Each module of the machinery in ``folder`` (named as imported: ``package.study.trial``),
    and the machinery's modules it imports, at its top or inside a function."""
    modules = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name and not modules[m].name == "__init__.py"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``, one path each (a depth-first search's back edges)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_machinerys_modules_import_one_another_without_a_cycle():
    graph = import_graph(MACHINERY, "tunetrack.machinery")
    assert len(graph) > 30 and cycles(graph) == []
    # The subpackages, each one concern: a module of one may use another's, never in a circle.
    groups = {name.split(".")[2] for name in graph if name.count(".") >= 3}
    assert groups == {"runtime", "data", "tracking", "training", "study", "cli", "commands"}


def test_the_cycle_check_finds_a_cycle(tmp_path):
    copy = tmp_path / "machinery"
    shutil.copytree(MACHINERY, copy)
    memory = copy / "runtime" / "memory.py"  # imported by the data, the cli and devices; now it imports them
    memory.write_text(memory.read_text() + "\n\ndef _late():\n    from tunetrack.machinery.cli import checks\n")
    found = cycles(import_graph(copy, "tunetrack.machinery"))
    assert found and all(path[0] == path[-1] for path in found)
    assert any("tunetrack.machinery.runtime.memory" in path for path in found)


def test_every_folder_of_the_package_is_a_package():
    """A folder without __init__.py imports from a checkout but is left out of a built wheel."""
    package = ROOT / "src" / "tunetrack"
    folders = {path.parent for path in package.rglob("*.py") if "__pycache__" not in path.parts}
    assert sorted(str(f.relative_to(package)) for f in folders if not (f / "__init__.py").exists()) == []


# What a function of the machinery may take: more says that a settings object does not travel whole.
MOST_PARAMETERS = 6


def long_signatures(folder: Path) -> list[str]:
    """The functions in ``folder`` that take more than MOST_PARAMETERS parameters (self aside)."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args
                named = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
                count = len([name for name in named if name not in ("self", "cls")])
                count += bool(arguments.vararg) + bool(arguments.kwarg)
                if count > MOST_PARAMETERS:
                    found.append(f"{path.relative_to(folder)}:{node.lineno} {node.name} takes {count}")
    return found


def test_no_function_of_the_machinery_takes_more_than_six_parameters(tmp_path):
    assert long_signatures(MACHINERY) == []
    copy = tmp_path / "machinery"
    shutil.copytree(MACHINERY, copy)
    memory = copy / "runtime" / "memory.py"
    memory.write_text(memory.read_text() + "\n\ndef wide(a, b, c, d, e, f, *, g=None):\n    pass\n")
    assert [line.split(":")[0] + " " + line.split(" ", 1)[1] for line in long_signatures(copy)] == [
        "runtime/memory.py wide takes 7"
    ]


def test_a_trial_of_the_experiment_fits_with_lightnings_trainer_itself():
    """optuna-examples' shape: suggest, build, trainer.fit, return; nothing of the machinery's in between."""
    from tunetrack.experiment import search

    source = inspect.getsource(search.objective)
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)]
    fits = [call for call in calls if isinstance(call.func, ast.Attribute) and call.func.attr == "fit"]
    assert len(fits) == 1 and isinstance(fits[0].func.value, ast.Name) and fits[0].func.value.id == "trainer"
    assert [keyword.arg for keyword in fits[0].keywords] == ["datamodule"]
    assert len(inspect.signature(search.objective).parameters) == 3
