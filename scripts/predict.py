"""Read handwritten digits from pictures with the best model a study registered.

Each PNG or JPEG (a photo or a scan of one digit, any size, dark on light or light on dark) is
prepared as MNIST's digits were (see src/mnist_hpo/digits.py), and the model, by default
models:/mnist-classifier@champion from MLflow's store in this folder, says which digit it is
and how sure it is. --as-request prints, instead, the body of a request to
`mlflow models serve` for those pictures (README: Using the model).

    python scripts/predict.py digit.png more/*.jpg
    python scripts/predict.py --model models:/mnist-classifier/3 seven.jpg
    python scripts/predict.py --as-request seven.jpg > seven.json
"""

from __future__ import annotations

import json
import sys

from mnist_hpo import cli

DEFAULT_MODEL = "models:/mnist-classifier@champion"


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="pictures of one digit each (PNG or JPEG)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="any MLflow model URI (default: %(default)s)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="the model's MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    parser.add_argument(
        "--as-request", action="store_true", help="print the pictures as a request to mlflow models serve"
    )
    args = parser.parse_args(argv)

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from mnist_hpo.digits import prepare

    pixels, names, failed = [], [], 0
    for name in args.images:
        try:
            with Image.open(name) as image:
                pixels.append(prepare(image))
            names.append(name)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            failed += 1
            why = "not a picture (PNG, JPEG, ...)" if isinstance(error, UnidentifiedImageError) else _reason(error)
            print(f"{parser.prog}: error: {name}: {why}", file=sys.stderr)
    batch = np.stack(pixels)[:, None] if pixels else np.zeros((0, 1, 28, 28), np.float32)
    if args.as_request:
        json.dump({"inputs": batch.round(4).tolist()}, sys.stdout)
        print()
        return 1 if failed else 0
    if not pixels:
        return 1

    scores = _load(parser, args.model, args.tracking_uri).predict(batch)
    probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    for name, p in zip(names, probabilities, strict=True):
        print(f"{name}: {p.argmax()} (p={p.max():.3f})")
    return 1 if failed else 0


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)


def _load(parser, model_uri: str, tracking_uri: str | None):
    """The model through MLflow's pyfunc; a missing one is a line that says which and where."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from mnist_hpo.stores import public, reason
    from mnist_hpo.tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as error:
        hint = "; a study registers it: python scripts/tune.py" if model_uri == DEFAULT_MODEL else ""
        parser.error(f"argument --model: cannot load {model_uri} from {public(uri)}: {reason(error, uri)}{hint}")


if __name__ == "__main__":
    sys.exit(main())
