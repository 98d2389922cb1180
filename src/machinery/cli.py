"""Command-line plumbing shared by the scripts: flags made from the fields of the experiment's
settings and of the options, every check made before any work starts, and every error as one
line that names the flag.

A field's metadata says what its flag needs: ``help``; ``minimum`` and ``maximum`` (numbers are
otherwise at least 1 if whole, above 0 if not); ``choices``, a list, or a registry named as
"module:NAME" and imported once the other flags are checked (it may import torch); ``flag``,
another name for the flag. A switch that is on by default gets a ``--no-`` flag.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import math
import os
import sys
import traceback
import typing
from collections.abc import Callable, Iterator

from machinery.contract import SettingError
from machinery.imports import import_files
from machinery.options import flag


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


def whole_number(minimum: int) -> Callable[[str], int]:
    """A flag's parser for a whole number of at least ``minimum``."""
    return _number(int, minimum, True, f"a whole number of at least {minimum}")


positive_int = whole_number(1)
positive_float = _number(float, 0, False, "a number greater than 0")


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the value is empty")
    return text


def _number_type(field: dataclasses.Field, integer: bool) -> Callable[[str], float]:
    """A whole number of at least 1, or a number above 0, unless the metadata sets other bounds."""
    minimum = field.metadata.get("minimum", 1 if integer else 0)
    inclusive = integer or "minimum" in field.metadata
    maximum = field.metadata.get("maximum", math.inf)
    if maximum < math.inf:
        bounds = f"from {minimum} to {maximum}"
    else:
        bounds = f"of at least {minimum}" if inclusive else f"greater than {minimum}"
    what = f"{'a whole number' if integer else 'a number'} {bounds}"
    return _number(int if integer else float, minimum, inclusive, what, maximum)


def _add_flags(parser: argparse.ArgumentParser, cls: type, list_registries: bool = False) -> None:
    """A flag for every field of ``cls``. No flag has a default of argparse's: what the command
    line does not name is absent, so that a run's recorded settings (train.py --from-trial)
    can stand where no flag says otherwise. With ``list_registries``, a registry's names are
    imported and shown (for --help)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if "flag" in field.metadata and field.metadata["flag"] is None:
            continue  # set by the command from other flags
        kind = hints[field.name]
        kinds = set(typing.get_args(kind)) - {type(None)} or {kind}
        help_ = field.metadata["help"]
        if kind is bool:
            name = flag(field) if not field.default else f"--no-{field.name.replace('_', '-')}"
            action = "store_false" if field.default else "store_true"
            parser.add_argument(name, dest=field.name, action=action, default=argparse.SUPPRESS, help=help_)
            continue
        if typing.get_origin(kind) is tuple:
            parser.add_argument(flag(field), dest=field.name, action="append", default=argparse.SUPPRESS,
                                metavar="FILE", help=help_)  # fmt: skip
            continue
        if kinds <= {int, float}:
            parse = _number_type(field, integer=int in kinds)
        else:
            parse = _text
        choices = field.metadata.get("choices")
        listed = choices if isinstance(choices, (tuple, list)) else None
        metavar = None
        if isinstance(choices, str) and list_registries:
            metavar = "{" + ",".join(_registry(choices)) + "}"
        default = "" if field.default is None else f" (default: {field.default})"
        parser.add_argument(flag(field), dest=field.name, type=parse, choices=listed, default=argparse.SUPPRESS,
                            metavar=metavar, help=help_ + default)  # fmt: skip


def parse(
    doc: str,
    settings_class: type,
    options_class: type,
    argv: list[str] | None = None,
    on_parsed: Callable[[typing.Any], None] | None = None,
    recorded: Callable[[argparse.ArgumentParser, typing.Any], dict] | None = None,
):
    """The experiment's settings and the options, from the command line: ``(parser, settings,
    options)``, the options' defaults that follow the settings filled in. Every flag is checked
    here; a registry's choices only after the files of --import are imported (and, for --help,
    before: it lists them). ``on_parsed``, if given, is called with the options as soon as the
    flags parse, before the experiment (and torch) is imported: tune.py starts its workers'
    imports there, beside its own (should a later check refuse a flag, that server finishes its
    imports, sees tune.py gone and ends). ``recorded(parser, options)``, if given, returns
    settings recorded elsewhere (a trial's) that stand where the command line names no other
    value."""
    argv = sys.argv[1:] if argv is None else list(argv)
    list_registries = "-h" in argv or "--help" in argv
    if list_registries:  # what --import registers is listed too
        imports = argparse.ArgumentParser(add_help=False)
        imports.add_argument("--import", dest="imports", action="append", default=[])
        import_files(None, tuple(imports.parse_known_args(argv)[0].imports))
    parser = Parser(doc)
    _add_flags(parser, settings_class, list_registries)
    _add_flags(parser, options_class, list_registries)
    given = {name: tuple(v) if isinstance(v, list) else v for name, v in vars(parser.parse_args(argv)).items()}
    options = options_class(**{f.name: given[f.name] for f in dataclasses.fields(options_class) if f.name in given})
    if on_parsed is not None:
        on_parsed(options)
    import_files(parser, options.imports)
    base = recorded(parser, options) if recorded is not None else {}
    names = {f.name for f in dataclasses.fields(settings_class)}
    settings = settings_class(**{name: value for name, value in {**base, **given}.items() if name in names})
    for obj in (settings, options):
        _check_registries(parser, obj)
    parser.named = frozenset(name for name in given if name in names)  # the settings the command line names
    return parser, settings, options.resolved(settings)


def load(path: str):
    """What "module:NAME" names: an experiment, a registry."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _registry(choices: str) -> list[str]:
    return list(load(choices))


def _check_registries(parser: argparse.ArgumentParser, obj) -> None:
    for field in dataclasses.fields(obj):
        choices = field.metadata.get("choices")
        if isinstance(choices, str):
            names = _registry(choices)
            if getattr(obj, field.name) not in names:
                parser.error(
                    f"argument {flag(field)}: invalid choice: {getattr(obj, field.name)!r} "
                    f"(choose from {', '.join(map(repr, names))}; one of your own: --import FILE, "
                    "docs/make-it-yours.md)"
                )


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
    from machinery.stores import StoreUnusable, check_tracking_uri
    from machinery.tracking import default_tracking_uri

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
    from machinery.stores import StoreUnusable, check_database

    try:
        check_database(url)
    except StoreUnusable as error:
        parser.error(f"argument --storage: {error}")


def check_memory(parser: argparse.ArgumentParser, experiment, settings, verbose: bool = False) -> None:
    """Refuse settings whose training cannot fit in this machine's memory, naming the setting
    whose smallest value would make it fit."""
    from machinery import memory

    with experiments_own_errors(parser, settings, verbose):
        available, needed = memory.available_bytes(), memory.bytes_to_train(experiment, settings)
    if available is None or needed <= available:
        return
    field = memory.to_blame(experiment, settings, available)
    parser.error(
        f"argument {flag(field)}: {getattr(settings, field.name)} needs about {memory.gigabytes(needed)} of memory "
        f"to train; this machine has {memory.gigabytes(available)} available"
    )


def check_workers(parser: argparse.ArgumentParser, experiment, settings, options) -> int:
    """How many workers to start: never more than trials, never more than fit in memory, the
    host's and, when they train on GPUs, the GPUs' (the default takes what fits; an explicit
    --workers that does not fit is refused), and a warning where they outnumber the cores."""
    from machinery import devices, memory
    from machinery.workers import available_cores, default_workers

    wanted = min(options.workers or default_workers(), options.n_trials)
    with experiments_own_errors(parser, settings, options.verbose):
        each = memory.bytes_to_train(experiment, memory.most_demanding(experiment, settings, options.fixed))
    available = memory.available_bytes()
    fit = wanted if available is None else (available - memory.PROCESS_BYTES) // each
    if fit < 1:
        parser.error(f"argument --workers: not even one worker fits: it needs about {memory.gigabytes(each)}")
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
    # (machinery.in_memory keeps it on the training device), neither measured here: the whole
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
    from machinery.files import DataUnavailable

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
    settings split it, before any store is touched; return where it came from. Unusable data,
    or settings it cannot be split by (a --val-size larger than the data), end the command in
    one line, before a study has a trial to fail."""
    import torch

    with experiments_own_errors(parser, settings, verbose):
        with torch.device("meta"):  # the data module is what is wanted here: no weights drawn for nothing
            _, data = experiment.build(settings)
        data.prepare_data()
        data.setup("fit")  # a split these settings cannot make fails here, not in every trial
    return data.source


def connect_tracking(parser: argparse.ArgumentParser, tracking_uri: str | None, experiment_name: str):
    """Open the checked tracking store and the experiment, creating them on first use."""
    from machinery.tracking import TrackingUnavailable, connect

    try:
        return connect(tracking_uri, experiment_name)
    except TrackingUnavailable as error:
        parser.error(f"{_tracking_source(tracking_uri)}: {error}")


def fail(prog: str, message: str, code: int = 1):
    """Leave with one line on stderr: the run's own error, not a traceback."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def add_picture_flags(parser: argparse.ArgumentParser, default_study: str) -> None:
    """The flags of the scripts that picture a finished study: which one, and where to write."""
    from machinery.options import DEFAULT_STORAGE

    parser.add_argument("--study-name", default=default_study, help="the study (default: %(default)s)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="its Optuna storage (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=None, help="its MLflow store (default: as tune.py's)")
    parser.add_argument("--out", default="img", help="where the pictures go (default: %(default)s)")


def load_study(parser: argparse.ArgumentParser, storage: str, study_name: str):
    """A finished study to picture, with at least one complete trial; else one line naming the flag."""
    import optuna

    from machinery.stores import public, reason

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
    space = experiment.search_space(settings)
    fixed = tuple(name for name in space if name in parser.named)
    for name in fixed:
        distribution, value = space[name], getattr(settings, name)
        try:
            inside = distribution._contains(distribution.to_internal_repr(value))
        except (ValueError, TypeError):
            inside = False
        if not inside:
            field = next(f for f in dataclasses.fields(settings) if f.name == name)
            parser.error(f"argument {flag(field)}: {value} is outside the space a study searches ({distribution})")
    return fixed


def studies_to_show(parser: argparse.ArgumentParser, url: str):
    """An Optuna storage that holds a study, opened to read; else one line naming --storage, and
    nothing created (an empty SQLite file included)."""
    import optuna

    from machinery.stores import StoreUnusable, check_database, public, reason, sqlite_path

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


def check_registered_model(parser: argparse.ArgumentParser, name: str) -> None:
    if set("'\"") & set(name):
        parser.error("argument --registered-model: give a name without quotes")
