"""The trained network as an MLflow model that anyone can use: logged with the run that made it
(in that run's experiment), loadable through mlflow.pytorch and mlflow.pyfunc on any machine,
and registered in the Model Registry with the alias ``champion`` on the best version so far.

The format is MLflow's pt2 (``torch.export``): a self-contained graph that mlflow.pytorch loads
with torch alone, without this package and without unpickling code. Its pyfunc, what `mlflow
models serve` runs, is served_model.py, which travels in the model's code folder with the
module that prepares the data set's pictures: it takes pictures (base64 PNG or JPEG) as well as
prepared pixels, with torch, NumPy, Pillow and SciPy alone. A pt2 file holds its weights on the
device it was exported on: so the network is always exported from the CPU, and served there
too: it loads and predicts everywhere, and the small networks a CPU trains answer on a CPU
faster than a copy to a GPU and back would take. The model's metadata says which task it was
trained for (its ``task``), its classes and the shape of one input, so that a reader can
prepare its input.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunetrack.machinery.objectives import comparative, sort_key

if TYPE_CHECKING:
    from tunetrack.machinery.tracking.mlflow_runs import Tracker

ALIAS = "champion"
MODEL_NAME = "model"  # the logged model's name in its run


class _ServedPyTorch:
    """mlflow.pytorch as a flavour for ``Model.log``: its pytorch flavour is mlflow.pytorch's (a
    pt2 graph that torch alone loads), and its pyfunc is served_model.py's, copied into the
    model's code folder with the module that prepares the data set's pictures: it takes pictures
    as well as prepared pixels, on the CPU everywhere."""

    __name__ = "mlflow.pytorch"  # how MLflow records the flavour that logged it

    @staticmethod
    def save_model(path, mlflow_model, *, served: dict, **kwargs) -> None:
        import mlflow.pytorch

        mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        # pt2 export reads the batch dimension off a tensor signature; the served model checks
        # its inputs itself, pictures included, which that signature would refuse.
        mlflow_model.signature = None
        code = os.path.join(path, CODE_FOLDER)
        os.makedirs(code, exist_ok=True)
        for name, source in served.pop("files").items():
            shutil.copyfile(source, os.path.join(code, f"{name}.py"))
        pyfunc = mlflow_model.flavors["python_function"]
        # Its "config" is what MLflow hands the loader (mlflow.models.model.MODEL_CONFIG).
        pyfunc.update(loader_module=SERVED_MODULE, code=CODE_FOLDER, config={"device": "cpu", **served})
        mlflow_model.save(os.path.join(path, "MLmodel"))


# What the served model imports, and its own code, as its code folder names it.
SERVED_REQUIREMENTS = ("torch", "numpy", "pillow", "scipy")
CODE_FOLDER, SERVED_MODULE, PICTURES_MODULE = "code", "tunetrack_served_model", "tunetrack_pictures"


def _served(picture, classes, input_shape) -> dict:
    """What the served model needs: its code's files by module name, its classes, the shape of
    one input, and the function that prepares a picture, as "module:function" of those files."""
    import inspect

    from tunetrack.machinery.data import pictures
    from tunetrack.machinery.tracking import served_model

    files = {SERVED_MODULE: inspect.getsourcefile(served_model)}
    preparation = None
    if picture is not None and getattr(picture, "__name__", "<lambda>") != "<lambda>":
        source = inspect.getsourcefile(picture)
        module = PICTURES_MODULE if picture.__module__ == pictures.__name__ else Path(source).stem
        files[module] = source
        preparation = f"{module}:{picture.__name__}"
    return {"files": files, "classes": list(classes), "input_shape": list(input_shape), "picture": preparation}


def log_model(tracker: Tracker, run_id: str, model, data, task: str, datasets: Mapping[str, type]) -> str:
    """Log ``model`` (its forward, on the CPU) as the model of the run ``run_id``, in the run's
    experiment, with the first five inputs of ``data``'s test split as its example; return its
    model id, so that ``models:/<id>`` loads it. Its metadata says what it was trained for: the
    task, the data set's name in ``datasets`` (how predict.py prepares a picture for it), the
    classes its outputs score and the shape of one input. It has no signature: the served model
    takes pictures as well as pixels, and checks each itself (served_model.py)."""
    from importlib.metadata import version

    import mlflow
    import torch
    from mlflow.models import Model, infer_signature

    data.setup("test")
    example = next(iter(data.test_dataloader()))[0][:5].cpu().numpy()
    module = model.cpu().eval()
    served = _served(getattr(type(data), "picture", None), [str(name) for name in data.classes], example.shape[1:])
    # log_model works through MLflow's fluent API: its store, and the experiment the logged
    # model belongs to (without this, MLflow's Default experiment, 0, not the run's).
    mlflow.set_tracking_uri(tracker.tracking_uri)
    experiment_id = tracker.experiment_of(run_id)
    mlflow.set_experiment(experiment_id=experiment_id)
    with _discarded_if_cut_off(tracker, experiment_id, run_id):
        info = Model.log(
            artifact_path=None,  # MLflow 3 names a logged model instead
            name=MODEL_NAME,
            flavor=_ServedPyTorch,
            run_id=run_id,
            pytorch_model=module,
            signature=infer_signature(example, module(torch.from_numpy(example)).detach().numpy()),
            input_example=example,
            serialization_format="pt2",
            served=served,
            # Stated, not inferred: inference imports the model in a subprocess, for many seconds.
            pip_requirements=[f"{name}=={version(name).split('+')[0]}" for name in SERVED_REQUIREMENTS],
            metadata={
                "task": task,
                "dataset": next((name for name, kind in datasets.items() if type(data) is kind), None),
                "classes": list(served["classes"]),  # copies: YAML would write a shared list as an anchor
                "input_shape": list(served["input_shape"]),
                "picture": served["picture"],  # predict.py prepares pictures so, without the experiment
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
    picture: str | None = None  # how a picture is prepared for it: "module:function" of its code folder

    def preparation(self):
        """The function that prepares a picture for this model, where it is this package's own
        (a data set of the experiment's); None where the model's data set names one of a
        user's file, or none."""
        from tunetrack.machinery.data import pictures

        module, _, function = (self.picture or "").partition(":")
        return getattr(pictures, function, None) if module == PICTURES_MODULE else None


def card_of(model_uri: str) -> ModelCard:
    import mlflow

    info = mlflow.models.get_model_info(model_uri)
    metadata = info.metadata or {}
    inputs = info.signature.inputs.inputs if info.signature is not None else []
    shape = tuple(inputs[0].shape[1:]) if inputs and getattr(inputs[0], "shape", None) else None  # a signature's
    shape = tuple(metadata["input_shape"]) if metadata.get("input_shape") else shape
    classes = metadata.get("classes")
    return ModelCard(
        metadata.get("task"), metadata.get("dataset"), classes and tuple(classes), shape, metadata.get("picture")
    )


def version_tags(settings: Mapping[str, object], splits, **facts) -> dict[str, object]:
    """What a registered version says of itself: ``facts`` (its study and trial, or its run; its
    scores), the digests of the data it was trained, validated and tested on, and every setting
    it trained with, its seed included, each as text that reads back as the same value."""
    data = {f"{split.context}_data": f"{split.name} {split.digest}" for split in splits}
    return {**facts, **data, **settings}


@dataclass(frozen=True)
class Score:
    """What a registered version is compared by: its objective's name and direction, its value,
    and, where it was trained again with other seeds, the mean and standard error of its runs
    (``runs`` of them, the first included)."""

    metric: str
    direction: str
    value: float
    mean: float | None = None
    sem: float | None = None
    runs: int = 1

    @property
    def estimate(self) -> float:
        """What it is compared by: the mean of its runs, or its one value."""
        return self.value if self.mean is None else self.mean

    @property
    def spread(self) -> float | None:
        """One run's standard deviation, where its runs measured it."""
        return None if self.sem is None else self.sem * math.sqrt(self.runs)

    def same_objective(self, other: Score) -> bool:
        return (self.metric, self.direction) == (other.metric, other.direction)

    def tags(self) -> dict[str, str]:
        tags = {"objective": self.metric, "direction": self.direction, self.metric: repr(self.value)}
        if self.mean is not None:
            tags |= {f"{self.metric}_mean": repr(self.mean), f"{self.metric}_sem": repr(self.sem),
                     "repeats": str(self.runs - 1)}  # fmt: skip
        return tags

    @classmethod
    def of(cls, tags: Mapping[str, str]) -> Score | None:
        """A version's score, as its tags say it; one registered before versions said their
        objective was registered by its val_loss. None where the tags hold no score."""
        metric = tags.get("objective", "val_loss")
        direction = tags.get("direction", "minimize")
        if metric not in tags:
            return None
        mean, sem = tags.get(f"{metric}_mean"), tags.get(f"{metric}_sem")
        runs = int(tags.get("repeats", 0)) + 1
        return cls(metric, direction, float(tags[metric]), mean and float(mean), sem and float(sem), runs)

    def __str__(self) -> str:
        if self.mean is None:
            return f"{self.value:.4f}"
        return f"{self.mean:.4f} ± {self.sem:.4f} (the mean of {self.runs} runs)"


def margin(a: Score, b: Score) -> float:
    """How much better one of ``a`` and ``b`` must be to be better beyond the noise: the standard
    error of the difference of their estimates, sqrt(sem_a^2 + sem_b^2). A single run's noise is
    unknown: it counts as one run of the other's, whose spread its repeats measured; with
    neither measured, the values alone decide (the margin is 0)."""
    errors = [s.sem if s.sem is not None else (other.spread or 0.0) for s, other in ((a, b), (b, a))]
    return math.sqrt(sum(e * e for e in errors))


def gain(challenger: Score, champion: Score) -> float:
    """How much better ``challenger``'s estimate is than ``champion``'s (negative: worse)."""
    difference = challenger.estimate - champion.estimate
    return -difference if challenger.direction == "minimize" else difference


@dataclass(frozen=True)
class Registered:
    """A registered version, and where the champion alias points now."""

    name: str
    version: int
    champion: int
    previous_champion: int | None
    champion_score: Score | None  # the champion's now, as compared: measured on this one's validation data if judged
    challenger: Score | None = None  # the best version's under this objective, on this data
    best_version: int | None = None  # that version
    comparable: bool = True  # the champion was chosen on the same data under the same objective, or measured so
    judged_here: bool = False  # the champion was measured on this version's validation data, under its objective
    beaten: Score | None = None  # the former champion's, as compared, where the alias moved

    def line(self) -> str:
        where = f"models:/{self.name}@{ALIAS}"
        ours = f"registered as {self.name} version {self.version}"
        champion, challenger = self.champion_score, self.challenger
        if not self.comparable:
            return (
                f"{ours}; {where} stays version {self.champion}, chosen on other data or by another objective, which "
                "cannot be measured on this one's (--registered-model NAME starts a registered model of its own)"
            )
        if self.champion == self.version == self.previous_champion:  # a study's best, registered before
            return f"{self.name} version {self.version} is this best model, as registered before: still {where}"
        metric = challenger.metric
        on_ours = " on this one's validation data" if self.judged_here else ""
        if self.champion == self.version:
            if self.beaten is None:
                return f"{ours}: now {where} (the best so far)"
            how = (
                ", chosen on other data or by another objective and measured on this one's" if self.judged_here else ""
            )
            noise = margin(challenger, self.beaten)
            beyond = f", better by more than the noise, {noise:.4f}" if noise else ""
            return (
                f"{ours}: now {where} (the best so far, was version {self.previous_champion}{how}: {metric} "
                f"{challenger} against {self.beaten}{beyond})"
            )
        if (improvement := gain(challenger, champion)) > 0:
            best = "this one's" if self.best_version == self.version else f"version {self.best_version}'s"
            return (
                f"{ours}; {where} stays version {self.champion}: the best {metric} on this data, {best}, "
                f"{challenger}, is {comparative(challenger.direction)} than its {champion}{on_ours} by "
                f"{improvement:.4f}, within the noise ({margin(challenger, champion):.4f}: docs/objectives.md)"
            )
        return (
            f"{ours}; {where} stays version {self.champion}, whose {metric}{on_ours}, {champion}, is "
            f"{'no higher' if champion.direction == 'minimize' else 'no lower'}"
        )


@dataclass(frozen=True)
class Candidate:
    """A logged model to register: what it is (its version's tags), its score under the
    objective, the tags that make it the same as a version already there, and the tag that
    names its validation data."""

    model_id: str
    tags: Mapping[str, object]
    score: Score
    same: tuple[str, ...] = ()
    validated_on: str | None = None


def register(
    tracker: Tracker,
    name: str,
    candidate: Candidate,
    judge: Callable[[dict[str, str]], dict[str, float] | None] | None = None,
) -> Registered:
    """Add the logged model ``candidate.model_id`` to the registered model ``name`` (created on
    first use), with its ``tags`` and ``score`` on the version, and point the alias at the best version of
    this objective on this data when it is better than the champion beyond the noise (see
    :func:`margin`), which is this one when it is the best. A version whose ``same`` tags equal
    these (the same trial of the same study, registered by an earlier session) is taken instead
    of a new one.

    Versions are compared by their scores only under one objective and direction, and where their
    tag ``validated_on`` (the validation data) is the same. A champion chosen under another
    objective or on other data is measured on this one's validation data under this one's
    objective: ``judge(its tags)`` gives its metrics there (a lucky split of a few images keeps
    the alias no longer); where it cannot, the champion stays. A version of the same score as
    the champion's, and newer, takes the alias: a model trained again to stand for a damaged one.

    Judged over every version rather than against this one alone, so that two studies that
    register at the same moment agree on the result.
    """
    from mlflow.exceptions import MlflowException

    from tunetrack.machinery.tracking.mlflow_runs import lost_a_race

    model_id, tags, score, same, validated_on = (candidate.model_id, candidate.tags, candidate.score, candidate.same,
                                                 candidate.validated_on)  # fmt: skip
    client = tracker.client
    try:
        client.create_registered_model(name, description="the best model of the studies that register here")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {**{k: str(v) for k, v in tags.items() if v is not None}, **score.tags()}

    def data_of(tags_of_a_version: Mapping[str, str]) -> str | None:
        return tags_of_a_version.get(validated_on) if validated_on else None

    def like_ours(tags_of_a_version: Mapping[str, str]) -> Score | None:
        theirs = Score.of(tags_of_a_version)
        same_data = data_of(tags_of_a_version) == data_of(version_tags)
        return theirs if theirs is not None and theirs.same_objective(score) and same_data else None

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
    # reading finds the alias where the versions registered say it belongs.
    before, judged, beaten = None, {}, None
    for attempt in range(5):
        versions = client.search_model_versions(f"name = '{name}'")
        try:
            previous = int(client.get_model_version_by_alias(name, ALIAS).version)
        except MlflowException:
            previous = None
        if attempt == 0:
            before = previous  # what this study found: its line says what it changed
        ours = [(v, theirs) for v in versions if (theirs := like_ours(v.tags)) is not None]
        key = sort_key(score.direction)
        best, best_score = min(ours, key=lambda pair: (key(pair[1].estimate), -int(pair[0].version)))
        held = next((v for v in versions if int(v.version) == previous), None)
        champion, champion_score = int(best.version), best_score
        if held is not None and int(held.version) != champion:
            champion_score = like_ours(held.tags)
            if champion_score is None:  # chosen on other data, or by another objective: measured on ours
                if previous not in judged:
                    judged[previous] = judge(dict(held.tags)) if judge else None
                measured = (judged[previous] or {}).get(score.metric)
                if measured is None:
                    return Registered(name, version, previous, before, Score.of(held.tags), best_score,
                                      comparable=False)  # fmt: skip
                # Measured once, on other data; where its repeats measured its noise under this
                # objective, that noise still stands for it.
                recorded = Score.of(held.tags)
                noise = recorded if recorded is not None and recorded.metric == score.metric else None
                champion_score = Score(score.metric, score.direction, measured, None, noise and noise.sem,
                                       noise.runs if noise else 1)  # fmt: skip
            improvement = gain(best_score, champion_score)
            if not (improvement > margin(best_score, champion_score) or improvement == 0):
                return Registered(name, version, previous, before, champion_score, best_score, int(best.version),
                                  judged_here=previous in judged)  # fmt: skip
            beaten = champion_score
        if champion == previous:
            break
        try:
            client.set_registered_model_alias(name, ALIAS, str(champion))
        except MlflowException as error:
            if attempt == 4 or not lost_a_race(error):
                raise
    return Registered(name, version, champion, before, best_score, best_score, judged_here=bool(judged), beaten=beaten)
