"""The scripts' flags, made from the fields of the experiment's settings and of the options
(--help lists every choice, a registry's included), and every error as one line that names the
flag.

A field's metadata says what its flag needs: ``help``; ``minimum`` and ``maximum`` (numbers are
otherwise at least 1 if whole, above 0 if not); ``choices``, a list, or a registry named as
"module:NAME"; ``flag``, another name for the flag. A switch that is on by default gets a
``--no-`` flag.

A registry's module imports torch (seconds); its names are read from its source instead where
it writes them as one literal dict that nothing else in it changes, so that --help and a wrong
choice answer at once. Otherwise, or when --import brings files of the user's that may add to
it, the registry is imported.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import math
import sys
import typing
from collections.abc import Callable

from tunetrack.machinery.options import flag
from tunetrack.machinery.runtime.user_files import import_files


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


def _add_flags(parser: argparse.ArgumentParser, cls: type, listed_with: tuple[str, ...] | None = None) -> None:
    """A flag for every field of ``cls``. No flag has a default of argparse's: what the command
    line does not name is absent, so that a run's recorded settings (train.py --from-trial)
    can stand where no flag says otherwise. With ``listed_with`` (for --help: the files of
    --import), a registry's names are shown."""
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
        if isinstance(choices, str) and listed_with is not None:
            metavar = "{" + ",".join(_registry(choices, listed_with)) + "}"
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
    imports = ()
    if list_registries:  # what --import registers is listed too
        imported = argparse.ArgumentParser(add_help=False)
        imported.add_argument("--import", dest="imports", action="append", default=[])
        imports = tuple(imported.parse_known_args(argv)[0].imports)
        import_files(None, imports)
    parser = Parser(doc)
    _add_flags(parser, settings_class, imports if list_registries else None)
    _add_flags(parser, options_class, imports if list_registries else None)
    given = {name: tuple(v) if isinstance(v, list) else v for name, v in vars(parser.parse_args(argv)).items()}
    options = options_class(**{f.name: given[f.name] for f in dataclasses.fields(options_class) if f.name in given})
    if not options.imports:  # the names the command line gives, refused before anything starts
        for cls in (settings_class, options_class):
            _check_registries(parser, cls, given, ())
    if on_parsed is not None:
        on_parsed(options)
    import_files(parser, options.imports)
    base = recorded(parser, options) if recorded is not None else {}
    names = {f.name for f in dataclasses.fields(settings_class)}
    settings = settings_class(**{name: value for name, value in {**base, **given}.items() if name in names})
    for obj in (settings, options):  # recorded ones, and those of files of --import, too
        _check_registries(parser, type(obj), dataclasses.asdict(obj), options.imports)
    parser.named = frozenset(name for name in given if name in names)  # the settings the command line names
    return parser, settings, options.resolved(settings)


def load(path: str):
    """What "module:NAME" names: an experiment, a registry."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _registry(choices: str, imports: tuple[str, ...] = ()) -> list[str]:
    """The names of the registry "module:NAME": read from the module's source where they can be,
    without importing it; imported where ``imports`` (files of --import) may have added some."""
    module, _, name = choices.partition(":")
    if not imports and module not in sys.modules and (names := literal_keys(module, name)) is not None:
        return names
    return list(load(choices))


def literal_keys(module: str, name: str) -> list[str] | None:
    """The keys of ``NAME = {"key": ..., ...}`` in ``module``'s source, or None where the source
    does not say them all: not one literal dict of strings, or NAME changed elsewhere in it."""
    try:
        spec = importlib.util.find_spec(module)
        source = spec.loader.get_source(module) if spec and spec.loader else None
    except (ImportError, ValueError):
        return None
    if source is None:
        return None
    tree = ast.parse(source)
    assigned = [node for node in tree.body if any(isinstance(t, ast.Name) and t.id == name for t in _targets(node))]
    if len(assigned) != 1 or not isinstance(assigned[0].value, ast.Dict):
        return None  # assigned twice, or as something other than a literal dict
    keys = assigned[0].value.keys
    if not all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in keys):
        return None
    for node in ast.walk(tree):  # nothing else may change it: NAME["x"] = ..., NAME.update(...)
        if isinstance(node, ast.Name) and node.id == name and not isinstance(node.ctx, ast.Load):
            if node not in _targets(assigned[0]):
                return None
        if isinstance(node, (ast.Attribute, ast.Subscript)) and isinstance(node.value, ast.Name):
            if node.value.id == name and (isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load)):
                return None
    return [k.value for k in keys]


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return node.targets
    return [node.target] if isinstance(node, ast.AnnAssign) else []


def _check_registries(parser: argparse.ArgumentParser, cls: type, values: dict, imports: tuple[str, ...]) -> None:
    """Refuse a value of ``values`` (the fields of ``cls`` by name) that its registry lacks."""
    for field in dataclasses.fields(cls):
        choices = field.metadata.get("choices")
        if isinstance(choices, str) and field.name in values:
            names = _registry(choices, imports)
            if values[field.name] not in names:
                parser.error(
                    f"argument {flag(field)}: invalid choice: {values[field.name]!r} "
                    f"(choose from {', '.join(map(repr, names))}; one of your own: --import FILE, "
                    "docs/make-it-yours.md)"
                )


def fail(prog: str, message: str, code: int = 1):
    """Leave with one line on stderr: the run's own error, not a traceback."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def add_picture_flags(parser: argparse.ArgumentParser, default_study: str) -> None:
    """The flags of the scripts that picture a finished study: which one, and where to write."""
    from tunetrack.machinery.options import DEFAULT_STORAGE

    parser.add_argument("--study-name", default=default_study, help="the study (default: %(default)s)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="its Optuna storage (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=None, help="its MLflow store (default: as tune.py's)")
    parser.add_argument("--out", default="img", help="where the pictures go (default: %(default)s)")
