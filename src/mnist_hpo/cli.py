"""Command-line plumbing shared by the scripts: the flags they have in common, checked before any
work starts, and every error as one line that names the flag."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mnist_hpo.mnist_files import MNIST_MD5, raw_dir

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
nonnegative_int = _number(int, 0, True, "a whole number of at least 0")
positive_float = _number(float, 0, False, "a number greater than 0")


def add_common_flags(parser: argparse.ArgumentParser, *, max_epochs: int) -> None:
    """The flags that mean the same in train.py and tune.py."""
    parser.add_argument(
        "--max-epochs", type=positive_int, default=max_epochs, help="epochs to train (default: %(default)s)"
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--val-size",
        type=_number(int, 1, True, "a whole number from 1 to 59999", maximum=59_999),
        default=5_000,
        help="of the 60,000 training images, how many to hold out for validation (default: %(default)s)",
    )
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


def connect_tracking(parser: argparse.ArgumentParser, tracking_uri: str | None, experiment: str):
    from mnist_hpo.tracking import TrackingUnavailable, connect

    if not experiment.strip():
        parser.error("argument --experiment: the name is empty")
    try:
        return connect(tracking_uri, experiment)
    except TrackingUnavailable as error:
        parser.error(f"argument --tracking-uri: {error}")


def fail(prog: str, message: str, code: int = 1):
    """Leave with one line on stderr: the run's own error, not a traceback."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_storage(parser: argparse.ArgumentParser, url: str) -> None:
    from mnist_hpo.studies import open_storage

    try:
        open_storage(url)
    except Exception as error:  # noqa: BLE001 - SQLAlchemy and Optuna raise many kinds
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        parser.error(f"argument --storage: cannot open {url!r}: {message}")
