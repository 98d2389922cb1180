"""A run's settings, read back from where they were recorded, so that train.py can train it
again: a trial of a study (``--from-trial STUDY:N``: the settings the trial trained with, as
it recorded them on itself, its seed included), or any MLflow run of train.py or of a trial
(``--from-run RUN_ID``: the settings it logged as its params). Values come back exactly: a
trial's as JSON numbers, a run's as the shortest text that reads back as the same float.
"""

from __future__ import annotations

import dataclasses
import shlex
import typing
from dataclasses import dataclass

from tunetrack.machinery.options import DEFAULT_STORAGE


@dataclass(frozen=True)
class Recorded:
    settings: dict
    threads: int | None  # None: not recorded
    objective: str | None = None  # what the trial's study optimized, as --objective says it (None: not recorded)
    direction: str | None = None


def train_again(study_name: str, number: int, storage: str = DEFAULT_STORAGE) -> str:
    """The command that trains trial ``number`` of the study again, ready to paste into a shell."""
    from tunetrack.machinery.tracking.stores import public

    again = f"python scripts/train.py --from-trial {shlex.quote(f'{study_name}:{number}')}"
    return again + (f" --storage {shlex.quote(public(storage))}" if storage != DEFAULT_STORAGE else "")


class NotRecorded(ValueError):
    """The trial or run named cannot be read, or recorded no settings; ``flag`` says which flag."""

    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag


def from_trial(storage: str, spec: str) -> Recorded:
    """The settings that the trial ``spec`` ("STUDY:NUMBER") of ``storage`` trained with."""
    import optuna  # here, as below: train.py reads its flags before it needs Optuna, MLflow or torch

    from tunetrack.machinery.study.studies import SETTINGS_ATTR, objective_of
    from tunetrack.machinery.tracking.stores import StoreUnusable, check_database, public, reason
    from tunetrack.machinery.training.fit import THREADS

    study_name, _, number = spec.rpartition(":")
    if not study_name or not number.isdigit():
        raise NotRecorded("--from-trial", f"{spec!r} is not STUDY:NUMBER (a study's name, a trial's number)")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        check_database(storage, read_only=True)
        opened = optuna.storages.RDBStorage(storage, skip_table_creation=True)  # read: nothing created
        study = optuna.load_study(study_name=study_name, storage=opened)
    except StoreUnusable as error:
        raise NotRecorded("--storage", str(error)) from None
    except KeyError:
        raise NotRecorded("--from-trial", f"no study {study_name!r} in {public(storage)} (--storage)") from None
    except Exception as error:  # noqa: BLE001 - SQLAlchemy and Optuna raise many kinds
        raise NotRecorded("--storage", f"cannot open {public(storage)}: {reason(error, storage)}") from None
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == int(number)), None)
    if trial is None:
        raise NotRecorded("--from-trial", f"study {study_name!r} has no trial {number} ({len(study.trials)} trials)")
    if SETTINGS_ATTR not in trial.user_attrs:
        raise NotRecorded("--from-trial", f"trial {number} of study {study_name!r} ended before it began to train")
    objective = objective_of(study)
    return Recorded(dict(trial.user_attrs[SETTINGS_ATTR]), trial.user_attrs.get(THREADS), objective.spec,
                    ",".join(objective.directions))  # fmt: skip


def from_run(tracking_uri: str, run_id: str, settings_class: type) -> Recorded:
    """The settings that the MLflow run ``run_id`` logged, as ``settings_class``'s fields' types."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tunetrack.machinery.study.studies import STUDY_UID_TAG
    from tunetrack.machinery.tracking.stores import public, reason
    from tunetrack.machinery.training.fit import THREADS

    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as error:
        why = reason(error, tracking_uri)
        raise NotRecorded("--from-run", f"no run {run_id} in {public(tracking_uri)}: {why}") from None
    tags, params = run.data.tags, run.data.params
    if STUDY_UID_TAG in tags and "mlflow.parentRunId" not in tags:
        study = tags.get("optuna.study", "?")
        raise NotRecorded(
            "--from-run", f"run {run_id} is study {study!r}'s own run: name one of its trials' runs, or --from-trial"
        )
    settings = typed(settings_class, params)
    if not settings:
        raise NotRecorded("--from-run", f"run {run_id} logged none of the settings: no run of train.py or a trial")
    return Recorded(settings, int(params[THREADS]) if THREADS in params else None)


def typed(settings_class: type, texts: dict[str, str]) -> dict:
    """The settings among ``texts`` (a run's params, a registered version's tags), each read back
    as its field's type."""
    hints = typing.get_type_hints(settings_class)
    fields = [field for field in dataclasses.fields(settings_class) if field.name in texts]
    return {field.name: _value(texts[field.name], hints[field.name]) for field in fields}


def _value(text: str, kind) -> object:
    """A param's text as the value of a field of type ``kind`` (MLflow keeps params as text)."""
    kinds = [k for k in typing.get_args(kind) or (kind,) if k is not type(None)]
    if text == "None" and len(kinds) < len(typing.get_args(kind) or (kind,)):
        return None
    kind = kinds[0]
    if kind is bool:
        return text == "True"
    return kind(text) if kind in (int, float) else text
