"""The trained network as an MLflow model that anyone can use: logged with the run that made it
(in that run's experiment), loadable through mlflow.pytorch and mlflow.pyfunc on any machine,
and registered in the Model Registry with the alias ``champion`` on the best version so far.

The format is MLflow's pt2 (``torch.export``): a self-contained graph that loads with torch
alone, without this package and without unpickling code. A pt2 file holds its weights on the
device it was exported on, and MLflow's pyfunc refuses to load it on another one: exported on a
CPU, it would not load on a machine with CUDA, where pyfunc picks the GPU by default. So the
network is always exported from the CPU, and its pyfunc flavour is pinned to the CPU: it loads
and predicts everywhere, and the small networks a CPU trains answer on a CPU faster than a copy
to a GPU and back would take. The model's metadata says which task it was trained for (its
``task``), so that a reader can prepare its input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunetrack.machinery.tracking.mlflow_runs import Tracker

ALIAS = "champion"
MODEL_NAME = "model"  # the logged model's name in its run


class _CpuPinnedPyTorch:
    """mlflow.pytorch as a flavour for ``Model.log``, whose pyfunc loads on the CPU everywhere."""

    __name__ = "mlflow.pytorch"  # how MLflow records the flavour that logged it

    @staticmethod
    def save_model(path, mlflow_model, **kwargs) -> None:
        import mlflow.pytorch

        mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        mlflow_model.flavors["python_function"]["model_config"] = {"device": "cpu"}
        mlflow_model.save(os.path.join(path, "MLmodel"))


def log_model(tracker: Tracker, run_id: str, model, data, task: str, datasets: Mapping[str, type]) -> str:
    """Log ``model`` (its forward, on the CPU) as the model of the run ``run_id``, in the run's
    experiment, with the first five inputs of ``data``'s test split as its example; return its
    model id, so that ``models:/<id>`` loads it. Its metadata says what it was trained for: the
    task, the data set's name in ``datasets`` (how predict.py prepares a picture for it), and
    the classes its outputs score."""
    import mlflow
    import torch
    from mlflow.models import Model, infer_signature

    data.setup("test")
    example = next(iter(data.test_dataloader()))[0][:5].cpu().numpy()
    module = model.cpu().eval()
    with torch.no_grad():
        output = module(torch.from_numpy(example)).numpy()
    # log_model works through MLflow's fluent API: its store, and the experiment the logged
    # model belongs to (without this, MLflow's Default experiment, 0, not the run's).
    mlflow.set_tracking_uri(tracker.tracking_uri)
    experiment_id = tracker.experiment_of(run_id)
    mlflow.set_experiment(experiment_id=experiment_id)
    with _discarded_if_cut_off(tracker, experiment_id, run_id):
        info = Model.log(
            artifact_path=None,  # MLflow 3 names a logged model instead
            name=MODEL_NAME,
            flavor=_CpuPinnedPyTorch,
            run_id=run_id,
            pytorch_model=module,
            signature=infer_signature(example, output),
            input_example=example,
            serialization_format="pt2",
            # Stated, not inferred: inference imports the model in a subprocess, for many seconds.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            metadata={
                "task": task,
                "dataset": next((name for name, kind in datasets.items() if type(data) is kind), None),
                "classes": [str(name) for name in data.classes],
            },
        )
    return info.model_id


@contextlib.contextmanager
def _discarded_if_cut_off(tracker: Tracker, experiment_id: str, run_id: str):
    """Logging a model writes its files, then marks it READY: cut off in between (a full disk),
    it would stay PENDING with half its files. Its files are deleted instead (freeing what they
    took), and it is marked FAILED where the store still takes a write."""

    def pending() -> list:
        return tracker.client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}' AND status = 'PENDING'"
        )

    before = set()  # another tune.py may be logging the study's best on the same run
    with contextlib.suppress(Exception):
        before = {model.model_id for model in pending()}
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            for model in (model for model in pending() if model.model_id not in before):
                location = model.artifact_location.removeprefix("file://")
                if os.path.isabs(location):
                    shutil.rmtree(location, ignore_errors=True)
                with contextlib.suppress(Exception):
                    tracker.client.finalize_logged_model(model.model_id, "FAILED")
        raise


@dataclass(frozen=True)
class ModelCard:
    """What a logged model was trained for, as log_model recorded it, and one input's shape."""

    task: str | None
    dataset: str | None
    classes: tuple[str, ...] | None
    input_shape: tuple[int, ...] | None  # one input's, without the batch


def card_of(model_uri: str) -> ModelCard:
    import mlflow

    info = mlflow.models.get_model_info(model_uri)
    metadata = info.metadata or {}
    inputs = info.signature.inputs.inputs if info.signature is not None else []
    shape = tuple(inputs[0].shape[1:]) if inputs and getattr(inputs[0], "shape", None) else None
    classes = metadata.get("classes")
    return ModelCard(metadata.get("task"), metadata.get("dataset"), classes and tuple(classes), shape)


def version_tags(settings: Mapping[str, object], splits, **facts) -> dict[str, object]:
    """What a registered version says of itself: ``facts`` (its study and trial, or its run; its
    scores), the digests of the data it was trained, validated and tested on, and every setting
    it trained with, its seed included, each as text that reads back as the same value."""
    data = {f"{split.context}_data": f"{split.name} {split.digest}" for split in splits}
    return {**facts, **data, **settings}


@dataclass(frozen=True)
class Registered:
    """A registered version, and where the champion alias points now."""

    name: str
    version: int
    champion: int
    previous_champion: int | None
    champion_val_loss: float
    comparable: bool = True  # validated on the same data as the champion, or measured on this one's
    judged_here: bool = False  # the champion's val_loss was measured on this version's validation data
    rival_val_loss: float | None = None  # the former champion's, measured so, where this one took the alias

    def line(self) -> str:
        where = f"models:/{self.name}@{ALIAS}"
        if not self.comparable:
            return (
                f"registered as {self.name} version {self.version}; {where} stays version {self.champion}, "
                "validated on other data, whose val_loss says nothing of this one's (--registered-model NAME "
                "starts a registered model of its own)"
            )
        if self.judged_here:
            return (
                f"registered as {self.name} version {self.version}; {where} stays version {self.champion}, whose "
                f"val_loss on this one's validation data, {self.champion_val_loss:.4f}, is no higher"
            )
        if self.rival_val_loss is not None and self.champion == self.version:
            return (
                f"registered as {self.name} version {self.version}: now {where} (version {self.previous_champion}, "
                f"validated on other data, has a val_loss of {self.rival_val_loss:.4f} on this one's)"
            )
        if self.champion == self.version == self.previous_champion:  # a study's best, registered before
            return f"{self.name} version {self.version} is this best model, as registered before: still {where}"
        if self.champion == self.version:
            was = "" if self.previous_champion is None else f", was version {self.previous_champion}"
            return f"registered as {self.name} version {self.version}: now {where} (the best so far{was})"
        return (
            f"registered as {self.name} version {self.version}; {where} stays version {self.champion}, "
            f"whose val_loss {self.champion_val_loss:.4f} is lower"
        )


def register(
    tracker: Tracker,
    model_id: str,
    name: str,
    tags: dict[str, object],
    val_loss: float,
    same: tuple[str, ...] = (),
    validated_on: str | None = None,
    judge: Callable[[dict[str, str]], float | None] | None = None,
) -> Registered:
    """Add the logged model ``model_id`` to the registered model ``name`` (created on first use),
    with ``tags`` and its ``val_loss`` on the version, and point the alias at the version with
    the lowest val_loss, which is this one when it is better than the champion. A version whose
    ``same`` tags equal these (the same trial of the same study, registered by an earlier
    session) is taken instead of a new one. Versions whose tag ``validated_on`` (the validation
    data) equals this one's are compared by their val_loss. A champion validated on other data
    is compared on this one's: ``judge(its tags)`` measures its val_loss there (a lucky split of
    a few images keeps the alias no longer), and where it cannot, the champion stays.

    Judged over every version rather than against the champion alone, so that two studies that
    register at the same moment agree on the result.
    """
    from mlflow.exceptions import MlflowException

    from tunetrack.machinery.tracking.mlflow_runs import lost_a_race

    client = tracker.client
    try:
        client.create_registered_model(name, description="the best model of the studies that register here")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {**{k: str(v) for k, v in tags.items() if v is not None}, "val_loss": repr(val_loss)}

    def data_of(tags_of_a_version: dict[str, str]) -> str | None:
        return tags_of_a_version.get(validated_on) if validated_on else None

    versions = client.search_model_versions(f"name = '{name}'")
    twins = [v for v in versions if same and all(v.tags.get(key) == version_tags[key] for key in same)]
    if twins:
        version = int(twins[0].version)
    else:
        source = f"models:/{model_id}"
        version = int(client.create_model_version(name, source, tags=version_tags, model_id=model_id).version)
    # Another study may register at the same moment (two machines that end together). Setting
    # the alias overwrites whatever another study set after we read, and the first setting of a
    # new alias refuses the second as a duplicate key: so read again after every write, until a
    # reading finds the alias on the best version registered.
    before, judged, rival = None, {}, None
    for attempt in range(5):
        versions = client.search_model_versions(f"name = '{name}'")
        try:
            previous = int(client.get_model_version_by_alias(name, ALIAS).version)
        except MlflowException:
            previous = None
        if attempt == 0:
            before = previous  # what this study found: its line says what it changed
        ours = [v for v in versions if "val_loss" in v.tags and data_of(v.tags) == data_of(version_tags)]
        # On a tie, the newest: a model trained again to stand for a damaged one takes its place.
        best = min(ours, key=lambda v: (float(v.tags["val_loss"]), -int(v.version)))
        champion_version = next((v for v in versions if int(v.version) == previous), None)
        if champion_version is not None and data_of(champion_version.tags) != data_of(version_tags):
            if previous not in judged:  # its val_loss on this version's validation data
                judged[previous] = judge(dict(champion_version.tags)) if judge else None
            if judged[previous] is None:
                return Registered(name, version, previous, before, float(champion_version.tags["val_loss"]), False)
            if judged[previous] <= float(best.tags["val_loss"]):
                return Registered(name, version, previous, before, judged[previous], judged_here=True)
            rival = judged[previous]
        champion = int(best.version)
        if champion == previous:
            break
        try:
            client.set_registered_model_alias(name, ALIAS, str(champion))
        except MlflowException as error:
            if attempt == 4 or not lost_a_race(error):
                raise
    return Registered(name, version, champion, before, float(best.tags["val_loss"]), rival_val_loss=rival)
