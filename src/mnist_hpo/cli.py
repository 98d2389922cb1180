"""Command-line plumbing shared by the scripts: the flags they have in common, checked before any
work starts, and every error as one line that names the flag."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from mnist_hpo.config import TrainConfig
from mnist_hpo.mnist_files import MNIST_MD5, raw_dir
from mnist_hpo.studies import DEFAULT_STORAGE

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: no usage block above them."""

    def __init__(self, doc: str, **kwargs):
        summary, _, details = doc.strip().partition("\n")
        super().__init__(
            description=summary, epilog=details.strip(), formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
        )

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(
    kind: type, minimum: float, inclusive: bool, what: str, maximum: float = math.inf
) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or not (value >= minimum if inclusive else value > minimum) or value > maximum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, 1, True, "a whole number of at least 1")
positive_float = _number(float, 0, False, "a number greater than 0")


def _flag_type(field: dataclasses.Field) -> Callable[[str], float]:
    """The parser of a TrainConfig field's flag: a whole number of at least 1, or a number
    above 0, unless the field's metadata sets other bounds."""
    integer = field.type in (int, "int")
    minimum = field.metadata.get("minimum", 1 if integer else 0)
    inclusive = integer or "minimum" in field.metadata
    maximum = field.metadata.get("maximum", math.inf)
    if maximum < math.inf:
        bounds = f"from {minimum} to {maximum}"
    else:
        bounds = f"of at least {minimum}" if inclusive else f"greater than {minimum}"
    what = f"{'a whole number' if integer else 'a number'} {bounds}"
    return _number(int if integer else float, minimum, inclusive, what, maximum)


def add_config_flags(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """A flag for each of the TrainConfig fields ``names`` (``--hidden-dim`` for hidden_dim),
    with its default and help text."""
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    for name in names:
        field = fields[name]
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=_flag_type(field),
            default=field.default,
            help=f"{field.metadata['help']} (default: %(default)s)",
        )


def config_from_flags(args: argparse.Namespace, names: Iterable[str]) -> dict[str, object]:
    """The TrainConfig fields ``names`` as the flags of add_config_flags set them."""
    return {name: getattr(args, name) for name in names}


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that mean the same in train.py and tune.py, beyond TrainConfig's."""
    parser.add_argument(
        "--data-dir", default="data", help="where MNIST is kept, fetched on first use (default: %(default)s)"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's default: sqlite:///mlflow.db here)",
    )
    parser.add_argument(
        "--accelerator", choices=ACCELERATORS, default="auto", help="where to train (default: %(default)s)"
    )


def add_picture_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the scripts that picture a finished study: which one, and where to write."""
    parser.add_argument("--study-name", default="mnist", help="the study (default: %(default)s)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="its Optuna storage (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=None, help="its MLflow store (default: as tune.py's)")
    parser.add_argument("--out", default="img", help="where the pictures go (default: %(default)s)")


def check_data_dir(parser: argparse.ArgumentParser, data_dir: str) -> None:
    path = Path(data_dir)
    if path.exists() and not path.is_dir():
        parser.error(f"argument --data-dir: {data_dir!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"argument --data-dir: cannot create {data_dir!r}: {error.strerror}")
    raw = raw_dir(path)
    if not all((raw / name).exists() for name in MNIST_MD5):
        writable = raw if raw.is_dir() else (raw.parent if raw.parent.is_dir() else path)
        if not os.access(writable, os.W_OK):
            parser.error(f"argument --data-dir: MNIST must be fetched into {str(raw)!r}, which is not writable")


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


def check_tracking(parser: argparse.ArgumentParser, tracking_uri: str | None, experiment: str) -> str:
    """The tracking URI to use (the flag's, MLFLOW_TRACKING_URI, or MLflow's default), checked
    without creating anything."""
    from mnist_hpo.stores import StoreUnusable, check_tracking_uri
    from mnist_hpo.tracking import default_tracking_uri

    if not experiment.strip():
        parser.error("argument --experiment: the name is empty")
    uri = tracking_uri or default_tracking_uri()
    try:
        check_tracking_uri(uri)
    except StoreUnusable as error:
        parser.error(f"argument --tracking-uri: {error}")
    return uri


def check_storage(parser: argparse.ArgumentParser, url: str) -> None:
    """The Optuna storage URL, checked without creating anything."""
    from mnist_hpo.stores import StoreUnusable, check_database

    try:
        check_database(url)
    except StoreUnusable as error:
        parser.error(f"argument --storage: {error}")


def check_memory(parser: argparse.ArgumentParser, config: TrainConfig) -> None:
    """Refuse a configuration whose training cannot fit in this machine's memory, naming the
    batch size if a smaller one would fit, and the network's size if not."""
    from mnist_hpo import memory

    def needed(config: TrainConfig) -> int:
        return memory.PROCESS_BYTES + sum(memory.bytes_to_train(config))

    available = memory.available_bytes()
    if available is None or needed(config) <= available:
        return
    flag = "batch_size" if needed(dataclasses.replace(config, batch_size=1)) <= available else "hidden_dim"
    parser.error(
        f"argument --{flag.replace('_', '-')}: {getattr(config, flag)} needs about {memory.gigabytes(needed(config))} "
        f"of memory to train; this machine has {memory.gigabytes(available)} available"
    )


def check_workers(parser: argparse.ArgumentParser, workers: int | None, n_trials: int, base: TrainConfig) -> int:
    """How many workers to start: never more than trials, never more than fit in memory (the
    default takes what fits; an explicit --workers that does not fit is refused), and a
    warning where they outnumber the cores."""
    from mnist_hpo import memory
    from mnist_hpo.search import largest_config
    from mnist_hpo.workers import available_cores, default_workers

    wanted = min(workers or default_workers(), n_trials)
    each = memory.PROCESS_BYTES + sum(memory.bytes_to_train(largest_config(base)))
    available = memory.available_bytes()
    fit = wanted if available is None else (available - memory.PROCESS_BYTES) // each
    if fit < 1:
        parser.error(f"argument --workers: not even one worker fits: it needs about {memory.gigabytes(each)}")
    if wanted > fit:
        if workers is None:
            return fit
        parser.error(
            f"argument --workers: {wanted} workers need about {memory.gigabytes(each * wanted)} of memory "
            f"({memory.gigabytes(each)} each); {memory.gigabytes(available)} is available: use --workers {fit} or fewer"
        )
    if wanted > available_cores():
        print(
            f"{parser.prog}: warning: {wanted} workers share {available_cores()} cores; one per core trains as many "
            "epochs a second with less memory",
            file=sys.stderr,
        )
    return wanted


def connect_tracking(parser: argparse.ArgumentParser, tracking_uri: str | None, experiment: str):
    """Open the checked tracking store and the experiment, creating them on first use."""
    from mnist_hpo.tracking import TrackingUnavailable, connect

    try:
        return connect(tracking_uri, experiment)
    except TrackingUnavailable as error:
        parser.error(f"argument --tracking-uri: {error}")


def fail(prog: str, message: str, code: int = 1):
    """Leave with one line on stderr: the run's own error, not a traceback."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def load_study(parser: argparse.ArgumentParser, storage: str, study_name: str):
    """A finished study to picture, with at least one complete trial; else one line naming the flag."""
    import optuna

    from mnist_hpo.stores import public, reason

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        parser.error(f"argument --study-name: no study {study_name!r} in {public(storage)}")
    except Exception as error:  # noqa: BLE001 - SQLAlchemy and Optuna raise many kinds
        parser.error(f"argument --storage: cannot open {public(storage)!r}: {reason(error, storage)}")
    if not study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        parser.error(f"argument --study-name: study {study_name!r} has no complete trial yet")
    return study
