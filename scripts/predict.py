"""Read pictures with the best model a study registered: which digit, or which garment.

Each picture (a PNG or JPEG photo or scan of one thing, any size up to 200 million pixels, dark
on light or light on dark, or drawn on a transparent background) is prepared as the images of
the data set the model learned were (src/experiment/pictures.py), and the model, by default
models:/mnist-classifier@champion from MLflow's store in this folder, says what it shows and
how sure it is. Every picture gets a line of its own: a bad one is said on stderr and the
others are read all the same (exit status 1 if any was bad). --as-request prints, instead, the
body of a request to `mlflow models serve` for the good ones.

    python scripts/predict.py digit.png more/*.jpg
    python scripts/predict.py --model models:/fashion-mnist-classifier@champion shoe.jpg
    python scripts/predict.py --as-request seven.jpg > seven.json
"""

from __future__ import annotations

import json
import sys

from experiment.settings import Settings
from machinery import cli, collector
from machinery.options import registered_name

DEFAULT_MODEL = f"models:/{registered_name(Settings().task)}@champion"
# Larger pictures are refused before they are decoded: Pillow's own guard against
# decompression bombs, replaced by a line that says so. Decoded, they are shrunk first.
MAX_PIXELS, WORKING_SIDE = 200_000_000, 2048


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="pictures of one thing each (PNG or JPEG)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="any MLflow model URI (default: %(default)s)")
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
    cli.import_files(parser, tuple(args.imports))

    import numpy as np

    from experiment.data import DATASETS

    collector.freeze_imports()  # torch and Lightning, with the experiment

    model_uri, tracking_uri = args.model, cli.check_tracking(parser, args.tracking_uri)
    task = _task(parser, model_uri, tracking_uri)
    data = DATASETS.get(task)
    if data is None or data.picture is None:
        parser.error(f"argument --model: {model_uri} learned {task}, whose pictures predict.py cannot prepare")

    pixels, names, failed = [], [], 0
    for name in args.images:
        try:
            pixels.append(_read(name, data.picture))
            names.append(name)
        except Exception as error:  # noqa: BLE001 - whatever is wrong with one picture, the others go on
            failed += 1
            print(f"{parser.prog}: error: {name}: {_reason(error)}", file=sys.stderr, flush=True)
    batch = np.stack(pixels)[:, None] if pixels else np.zeros((0, 1, 28, 28), np.float32)
    if args.as_request:
        json.dump({"inputs": batch.round(4).tolist()}, sys.stdout)
        print()
        return 1 if failed else 0
    if not pixels:
        return 1

    import mlflow

    scores = mlflow.pyfunc.load_model(model_uri).predict(batch)
    probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    for name, p in zip(names, probabilities, strict=True):
        print(f"{name}: {data.classes[p.argmax()]} (p={p.max():.3f})")
    return 1 if failed else 0


def _read(name: str, prepare):
    """The picture in the file ``name``, prepared; refused in one line if it is too large."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the check below replaces Pillow's warning and error
    with Image.open(name) as image:  # reads the header only
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ValueError(f"{width} x {height} is more than predict.py reads ({MAX_PIXELS:,} pixels)")
        image.draft("RGB", (WORKING_SIDE, WORKING_SIDE))  # a JPEG decodes straight to a smaller size
        image.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BOX)
        return prepare(image)


def _reason(error: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not a picture (PNG, JPEG, ...)"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _task(parser, model_uri: str, tracking_uri: str) -> str:
    """What the model learned, as it was logged; a missing model is a line that says which and where."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from machinery.registry import task_of
    from machinery.stores import public, reason

    mlflow.set_tracking_uri(tracking_uri)
    try:
        return task_of(model_uri) or Settings().task
    except (MlflowException, OSError) as error:
        hint = "; a study registers it: python scripts/tune.py" if model_uri == DEFAULT_MODEL else ""
        why = reason(error, tracking_uri)
        parser.error(f"argument --model: cannot load {model_uri} from {public(tracking_uri)}: {why}{hint}")


if __name__ == "__main__":
    collector.pause()  # until the imports are done (machinery.collector)
    sys.exit(main())
