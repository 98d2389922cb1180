"""Every check a command makes before any work starts, each failure one line that names the
flag: the accelerator, the stores, memory and workers, the data, a study to show."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import traceback
from collections.abc import Iterator
from typing import NoReturn

from tunetrack.machinery.cli.flags import fail
from tunetrack.machinery.contract import SettingError
from tunetrack.machinery.options import flag


def setting_error(parser: argparse.ArgumentParser, settings, error: SettingError):
    """An experiment's SettingError, as the one line that names its flag."""
    field = next((f for f in dataclasses.fields(settings) if f.name == error.setting), None)
    name = flag(field) if field else f"--{error.setting.replace('_', '-')}"
    parser.error(f"argument {name}: {error}")


def check_accelerator(parser: argparse.ArgumentParser, accelerator: str) -> None:
    if accelerator in ("auto", "cpu"):
        return  # always there; no need to start torch to know
    import torch

    available = {
        "gpu": torch.cuda.is_available() or torch.backends.mps.is_available(),
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(accelerator, True):
        parser.error(f"argument --accelerator: {accelerator!r} is not available on this machine")


def check_tracking(
    parser: argparse.ArgumentParser, tracking_uri: str | None, read_only: bool = False, hint: str = ""
) -> str:
    """The tracking URI to use (the flag's, MLFLOW_TRACKING_URI, or MLflow's default), checked
    without creating anything (``read_only``: a store to read from, which must be there)."""
    from tunetrack.machinery.tracking.mlflow_runs import default_tracking_uri
    from tunetrack.machinery.tracking.stores import StoreUnusable, check_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    try:
        check_tracking_uri(uri, read_only)
    except StoreUnusable as error:
        parser.error(f"{_tracking_source(tracking_uri)}: {error}" + (f": {hint}" if hint else ""))
    return uri


def _tracking_source(tracking_uri: str | None) -> str:
    """Where the tracking URI came from, as an error names it."""
    if tracking_uri is None and os.environ.get("MLFLOW_TRACKING_URI"):
        return "environment variable MLFLOW_TRACKING_URI"
    return "argument --tracking-uri"


def check_storage(parser: argparse.ArgumentParser, url: str) -> None:
    """The Optuna storage URL, checked without creating anything."""
    from tunetrack.machinery.tracking.stores import StoreUnusable, check_database

    try:
        check_database(url)
    except StoreUnusable as error:
        parser.error(f"argument --storage: {error}")


def check_memory(parser: argparse.ArgumentParser, experiment, settings, verbose: bool = False) -> None:
    """Refuse settings whose training cannot fit in this machine's memory, naming the setting
    whose smallest value would make it fit."""
    from tunetrack.machinery.runtime import memory

    with experiments_own_errors(parser, settings, verbose):
        available, needed = memory.available_bytes(), memory.bytes_to_train(experiment, settings)
    if available is not None and needed > available:
        _too_large(parser, experiment, settings, needed, available)


def _too_large(parser: argparse.ArgumentParser, experiment, settings, needed: int, available: int):
    """One line naming the setting whose smallest value alone would make ``settings`` fit."""
    from tunetrack.machinery.runtime import memory

    field = memory.to_blame(experiment, settings, available)
    parser.error(
        f"argument {flag(field)}: {getattr(settings, field.name)} needs about {memory.gigabytes(needed)} of memory "
        f"to train; this machine has {memory.gigabytes(available)} available"
    )


def check_network(parser: argparse.ArgumentParser, experiment, settings, verbose: bool = False) -> None:
    """Build the model for the data's real input shape, on the meta device (no weights drawn, no
    picture decoded), and run an example batch through it. A network that cannot take the data's
    inputs is one line that names it, its file and line, the layer that refused and why, and,
    where the data module says which setting sizes its inputs (``resized_by``), the smallest
    size the network takes and that setting's flag."""
    from tunetrack.machinery.runtime.shapes import refusal, smallest_size

    with experiments_own_errors(parser, settings, verbose):
        refused, data = refusal(experiment, settings)
    if refused is None:
        return
    if verbose:
        traceback.print_exception(refused.error)
    setting = getattr(data, "resized_by", None)
    field = next((f for f in dataclasses.fields(settings) if f.name == setting), None)
    if field is None:
        fail(parser.prog, str(refused))
    side = smallest_size(experiment, settings, setting)
    fits = f"it takes them from {side}x{side}: {flag(field)} {side}" if side else "no size up to 4096 fits it"
    parser.error(f"argument {flag(field)}: {refused}; {fits}")


def check_workers(parser: argparse.ArgumentParser, experiment, settings, options) -> int:
    """How many workers to start: never more than trials, never more than fit in memory, the
    host's and, when they train on GPUs, the GPUs' (the default takes what fits; an explicit
    --workers that does not fit is refused), and a warning where they outnumber the cores."""
    from tunetrack.machinery.runtime import devices, memory
    from tunetrack.machinery.study.workers import available_cores, default_workers

    wanted = min(options.workers or default_workers(), options.most_trials)
    with experiments_own_errors(parser, settings, options.verbose):
        demanding = memory.most_demanding(experiment, settings, options.fixed)
        each = memory.bytes_to_train(experiment, demanding)
    available = memory.available_bytes()
    fit = wanted if available is None else (available - memory.PROCESS_BYTES) // each
    if fit < 1:  # not even one: the settings are what does not fit, not the workers
        _too_large(parser, experiment, demanding, each, available)
    if wanted > fit:
        if options.workers is not None:
            parser.error(
                f"argument --workers: {wanted} workers need about {memory.gigabytes(each * wanted)} of memory "
                f"({memory.gigabytes(each)} each); {memory.gigabytes(available)} is available: "
                f"use --workers {fit} or fewer"
            )
        wanted = fit
    # The same estimate sizes a worker on its GPU. Part of it is host-only (Python and the
    # libraries), but on the GPU each worker holds a CUDA context of its own and its data set
    # (machinery.data.in_memory keeps it on the training device), neither measured here: the whole
    # estimate stands in for them, erring toward fewer workers on a GPU, not toward one that
    # runs out of the GPU's memory in the middle of a study.
    gpus = devices.training_gpus(options.accelerator)
    if gpus and wanted > (on_gpus := devices.workers_that_fit(gpus, each)):
        if options.workers is not None or on_gpus < 1:
            parser.error(f"argument --workers: {devices.too_many(gpus, wanted, each)}")
        wanted = on_gpus
    if wanted > available_cores():
        print(
            f"{parser.prog}: warning: {wanted} workers share {available_cores()} cores; one per core trains as many "
            "epochs a second with less memory",
            file=sys.stderr,
        )
    return wanted


@contextlib.contextmanager
def experiments_own_errors(parser: argparse.ArgumentParser, settings, verbose: bool) -> Iterator[None]:
    """Run the experiment's code (build, a network's forward): a SettingError is the one line that
    names its flag, data that cannot be had the line that says why; any other error is the one
    line that names the experiment's file and line where it was raised, and what it said (its
    traceback first, with --verbose)."""
    from tunetrack.machinery.data.files import DataUnavailable

    try:
        yield
    except SettingError as error:
        setting_error(parser, settings, error)
    except DataUnavailable as error:
        fail(parser.prog, str(error))
    except Exception as error:  # noqa: BLE001 - whatever the experiment's code raises
        if verbose:
            traceback.print_exception(error)
        fail(parser.prog, f"{raised_where(error)}: {type(error).__name__}: {error}")


def raised_where(error: BaseException) -> str:
    """The file and line, outside this package and the libraries, where ``error`` was raised: a
    user's network, data module or file of --import; the innermost such frame."""
    machinery = os.path.dirname(os.path.abspath(__file__))
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if "site-packages" not in frame.filename and not frame.filename.startswith((machinery, "<"))]  # fmt: skip
    if not frames:
        return "the experiment"
    frame = frames[-1]
    return f"{os.path.relpath(frame.filename)}:{frame.lineno}"


def prepare_data(parser: argparse.ArgumentParser, experiment, settings, verbose: bool = False) -> str:
    """Make the data present and verified (fetched on first use), and read it once as the
    settings split it, before any store is touched; return where it came from and the size of
    each split, in a line. Unusable data, or settings it cannot be split by (a --val-size larger
    than the data), end the command in one line, before a study has a trial to fail; so does a
    Ctrl-C while the data is fetched or decoded (nothing half-made is kept: see data.files and
    data.image_folders)."""
    import torch

    from tunetrack.machinery.data.batches import examples

    try:
        with experiments_own_errors(parser, settings, verbose):
            with torch.device("meta"):  # the data module is what is wanted here: no weights drawn for nothing
                _, data = experiment.build(settings)
            data.prepare_data()
            data.setup("fit")  # a split these settings cannot make fails here, not in every trial
            train, val = examples(data.train_dataloader()), examples(data.val_dataloader())
            data.setup("test")
            test = examples(data.test_dataloader())
    except KeyboardInterrupt:
        fail(parser.prog, "interrupted while the data was read: nothing half-made was kept; run again", 130)
    return f"data: {data.source}: {train:,} to train, {val:,} to validate, {test:,} to test"


def connect_tracking(parser: argparse.ArgumentParser, tracking_uri: str | None, experiment_name: str):
    """Open the checked tracking store and the experiment, creating them on first use."""
    from tunetrack.machinery.tracking.mlflow_runs import TrackingUnavailable, connect

    try:
        return connect(tracking_uri, experiment_name)
    except TrackingUnavailable as error:
        tracking_unavailable(parser, tracking_uri, error)


def tracking_unavailable(parser: argparse.ArgumentParser, tracking_uri: str | None, error: Exception) -> NoReturn:
    """One line naming the flag (or the environment variable) of a tracking store that cannot be used."""
    parser.error(f"{_tracking_source(tracking_uri)}: {error}")


def load_study(parser: argparse.ArgumentParser, storage: str, study_name: str):
    """A finished study to picture, with at least one complete trial; else one line naming the flag."""
    import optuna

    from tunetrack.machinery.tracking.stores import public, reason

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        parser.error(f"argument --study-name: no study {study_name!r} in {public(storage)}")
    except Exception as error:  # noqa: BLE001 - SQLAlchemy and Optuna raise many kinds
        parser.error(f"argument --storage: cannot open {public(storage)!r}: {reason(error, storage)}")
    if not study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        parser.error(f"argument --study-name: study {study_name!r} has no complete trial yet")
    return study


def fix_searched(parser: argparse.ArgumentParser, experiment, settings) -> tuple[str, ...]:
    """The searched settings that the command line names (tune.py --batch-size 64): a study
    fixes them and searches the others. A value the space does not hold is refused."""
    from tunetrack.machinery.study.space import within

    space = experiment.search_space(settings)
    fixed = tuple(name for name in space if name in parser.named)
    for name in fixed:
        distribution, value = space[name], getattr(settings, name)
        if not within(distribution, value):
            field = next(f for f in dataclasses.fields(settings) if f.name == name)
            parser.error(f"argument {flag(field)}: {value} is outside the space a study searches ({distribution})")
    return fixed


def studies_to_show(parser: argparse.ArgumentParser, url: str):
    """An Optuna storage that holds a study, opened to read; else one line naming --storage, and
    nothing created (an empty SQLite file included)."""
    import optuna

    from tunetrack.machinery.tracking.stores import StoreUnusable, check_database, public, reason, sqlite_path

    first = "make taste or make tune first"
    try:
        check_database(url, read_only=True)
        path = sqlite_path(url)
        names = []
        if path is None or path.stat().st_size:  # an empty file is a SQLite database with no tables
            storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
            names = [study.study_name for study in storage.get_all_studies()]
    except StoreUnusable as error:
        parser.error(f"argument --storage: {error}: {first}")
    except Exception as error:  # noqa: BLE001 - tables of another program's, a server that refuses, ...
        parser.error(f"argument --storage: {public(url)} is no Optuna storage ({reason(error, url)})")
    if not names:
        parser.error(f"argument --storage: {public(url)} holds no study yet: {first}")
    return storage


def check_objective(parser: argparse.ArgumentParser, experiment, options):
    """The options with their objective chosen (--objective and --direction, or the experiment's),
    or one line naming the flag that cannot be used."""
    from tunetrack.machinery.objectives import ObjectiveError

    try:
        options = options.aimed(experiment)
    except ObjectiveError as error:
        parser.error(f"argument {error.flag}: {error}")
    if options.goal.several and getattr(options, "repeats", None):
        parser.error(
            "argument --repeats: a study of two objectives registers its Pareto front's best on the first objective, "
            "unrepeated; repeats compare the means of one objective"
        )
    return options


def check_registered_model(parser: argparse.ArgumentParser, name: str) -> None:
    """A name the Model Registry takes (MLflow's rule: no '/' or ':', not a path that is not
    itself, such as '..'), and that its search filters can say (no quotes)."""
    if not name.strip() or name in (".", "..") or set("/:") & set(name):
        parser.error(f"argument --registered-model: {name!r} is no name the Model Registry takes (no '/' or ':')")
    if set("'\"") & set(name):
        parser.error("argument --registered-model: give a name without quotes")
