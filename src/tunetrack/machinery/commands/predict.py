"""predict.py: pictures in, a registered model's answers out, each picture prepared as the
images of the model's data set were."""

from __future__ import annotations

import json
import sys

from tunetrack.machinery.cli import checks, flags
from tunetrack.machinery.options import registered_name
from tunetrack.machinery.runtime import collector, console, user_files

# An answer less likely than this is said to be uncertain: the picture may not show one thing
# of the classes clearly.
UNSURE = 0.5
# Larger pictures are refused before they are decoded: Pillow's own guard against
# decompression bombs, replaced by a line that says so. Decoded, they are shrunk first.
MAX_PIXELS, WORKING_SIDE = 200_000_000, 2048


def main(doc: str, settings_class: type, experiment_path: str, argv: list[str] | None = None) -> int:
    console.forgive()
    default_model = f"models:/{registered_name(settings_class().task)}@champion"
    parser = flags.Parser(doc)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="pictures of one thing each (PNG or JPEG)")
    parser.add_argument("--model", default=default_model, help="any MLflow model URI (default: %(default)s)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="the model's MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    parser.add_argument(
        "--as-request", action="store_true", help="print the pictures as a request to mlflow models serve"
    )
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="FILE",
                        help="a Python file to import first, with a data set of your own registered in it")  # fmt: skip
    args = parser.parse_args(argv)
    user_files.import_files(parser, tuple(args.imports))

    import numpy as np

    model_uri = args.model
    tracking_uri = checks.check_tracking(
        parser, args.tracking_uri, read_only=True, hint="a study registers a model there"
    )
    card = _card(parser, model_uri, tracking_uri, default_model)
    # The model says how its pictures are prepared: the experiment (torch, Lightning, Optuna:
    # seconds) is imported only for a data set of a user's own, whose preparation is theirs.
    prepare, classes = card.preparation(), card.classes
    if prepare is None or classes is None:
        kind = flags.load(experiment_path).datasets.get(card.dataset or card.task)
        prepare, classes = prepare or getattr(kind, "picture", None), classes or getattr(kind, "classes", None)
    collector.freeze_imports()
    if prepare is None or card.input_shape is None:
        what = card.dataset or card.task
        parser.error(f"argument --model: {model_uri} learned {what}, whose pictures predict.py cannot prepare")

    pixels, names, failed = [], [], 0
    for name in args.images:
        try:
            pixels.append(_read(name, prepare, card.input_shape))
            names.append(name)
        except Exception as error:  # noqa: BLE001 - whatever is wrong with one picture, the others go on
            failed += 1
            print(f"{parser.prog}: error: {name}: {_reason(error)}", file=sys.stderr, flush=True)
    batch = np.stack(pixels).astype(np.float32) if pixels else np.zeros((0, *card.input_shape), np.float32)
    if args.as_request:
        json.dump({"inputs": batch.round(4).tolist()}, sys.stdout)
        print()
        return 1 if failed else 0
    if not pixels:
        return 1

    import logging

    import mlflow

    # torch.export logs, traceback and all, a model file it cannot read before it raises; the
    # one line below says what is wrong.
    logging.getLogger("torch.export").setLevel(logging.CRITICAL)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as error:  # noqa: BLE001 - a file missing, truncated, garbled: each its own exception
        flags.fail(parser.prog, damaged(model_uri, error, tracking_uri))
    scores = model.predict(batch)
    probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    for name, p in zip(names, probabilities, strict=True):
        print(answer(name, classes[p.argmax()], float(p.max())))
    return 1 if failed else 0


def answer(name: str, label: str, p: float) -> str:
    """One picture's line: what it shows, and how likely; an unlikely answer says so."""
    return f"{name}: {label} (p={p:.3f}{', uncertain' if p < UNSURE else ''})"


def _read(name: str, prepare, shape: tuple[int, ...]):
    """The picture in the file ``name``, prepared; refused in one line if it is too large."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the check below replaces Pillow's warning and error
    with Image.open(name) as image:  # reads the header only
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ValueError(f"{width} x {height} is more than predict.py reads ({MAX_PIXELS:,} pixels)")
        image.draft("RGB", (WORKING_SIDE, WORKING_SIDE))  # a JPEG decodes straight to a smaller size
        image.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BOX)
        return prepare(image, shape)


def _reason(error: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not a picture (PNG, JPEG, ...)"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _card(parser, model_uri: str, tracking_uri: str, default_model: str):
    """What the model learned, as it was logged; a missing model is a line that says which and where."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tunetrack.machinery.tracking.mlflow_runs import follow_a_moved_folder
    from tunetrack.machinery.tracking.registry import card_of
    from tunetrack.machinery.tracking.stores import public, reason

    follow_a_moved_folder(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return card_of(model_uri)
    except Exception as error:  # noqa: BLE001 - its description (MLmodel) may be what MLflow cannot read
        if isinstance(error, MlflowException) and error.error_code == "RESOURCE_DOES_NOT_EXIST":
            hint = "; a study registers it: python scripts/tune.py" if model_uri == default_model else ""
            why = reason(error, tracking_uri)
            parser.error(f"argument --model: cannot load {model_uri} from {public(tracking_uri)}: {why}{hint}")
        try:  # the store answers: what failed is the model's own files
            mlflow.tracking.MlflowClient().search_registered_models(max_results=1)
        except Exception as unread:  # noqa: BLE001 - a server that went away, a store that cannot be read
            flags.fail(parser.prog, f"cannot read {public(tracking_uri)}: {reason(unread, tracking_uri)}")
        flags.fail(parser.prog, damaged(model_uri, error, tracking_uri))


def damaged(model_uri: str, error: BaseException, tracking_uri: str) -> str:
    """A model that is registered but cannot be loaded, as one line: which version, what is wrong,
    and what brings a good one back."""
    import mlflow

    from tunetrack.machinery.study.retraining import train_again
    from tunetrack.machinery.tracking.stores import reason

    what = f"{type(error).__name__}: {reason(error, tracking_uri)}"
    said = f"{model_uri} cannot be loaded: its files are damaged ({what})"
    name, _, rest = model_uri.removeprefix("models:/").partition("@")
    try:
        client = mlflow.tracking.MlflowClient()
        version = client.get_model_version_by_alias(name, rest) if rest else None
    except Exception:  # noqa: BLE001 - no registry, no such alias: only the model's own URI to go by
        version = None
    if version is None:
        return said
    tags = version.tags
    again = (
        f"{train_again(tags['study'], tags['trial'])} --register"
        if "study" in tags and "trial" in tags
        else f"python scripts/train.py --from-run {tags['run_id']} --register"
        if "run_id" in tags
        else None
    )  # fmt: skip
    others = f"--model models:/{name}/VERSION for another version"
    return (
        f"{said}: it is version {version.version} of {name}; "
        + (f"train it again: {again}, or " if again else "")
        + others
    )
