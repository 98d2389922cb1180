"""The pyfunc of a logged classifier: what `mlflow models serve` and `mlflow.pyfunc.load_model`
run. A copy of this file travels in the model's own code folder, beside a copy of the module
that prepares its data set's pictures, so that the model answers wherever it is served with
torch, NumPy, Pillow and SciPy alone, without this package.

It takes either of:

- **pictures**: PNG or JPEG files as base64 text, in a field or column named ``image``
  (``{"inputs": {"image": ["iVBORw0KGgo..."]}}``, or ``{"dataframe_records": [{"image": ...}]}``),
  each prepared as the data set's pictures were (as predict.py prepares them), and answered
  with its class, that class's probability, every class's probability, and the raw scores;
- **pixels** already prepared: a float32 array of shape (N, channels, height, width) in [0, 1]
  (``{"inputs": [[[[0.0, ...]]]]}``, as ``predict.py --as-request`` prints), answered with the raw
  scores, one row of class scores per input.

Pixels that are not numbers, outside [0, 1] or of another shape, and pictures that cannot be
read or prepared, are refused with HTTP 400 and a line that says why.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import os

import numpy as np

PICTURES = "image"  # the field or column that holds base64 pictures


def _load_pyfunc(path: str, model_config: dict | None = None):
    """MLflow's entry point: ``path`` is the model's data folder, ``model_config`` its flavour's."""
    return ServedClassifier(path, model_config or {})


class ServedClassifier:
    def __init__(self, path: str, config: dict):
        import torch

        self.network = torch.export.load(os.path.join(path, "model.pt2")).module()  # on the CPU, as exported
        self.classes = [str(name) for name in config.get("classes") or []]
        self.shape = tuple(config.get("input_shape") or ())
        self.picture = config.get("picture")  # "module:function" of the code folder, or None

    def predict(self, data, params: dict | None = None):
        pictures = _pictures(data)
        if pictures is None:
            return self._scores(_pixels(data, self.shape))
        prepared = np.stack([self._prepared(i, text) for i, text in enumerate(pictures)]).astype(np.float32)
        scores = self._scores(prepared)
        probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        names = self.classes or [str(i) for i in range(scores.shape[1])]
        return [
            {
                "class": names[int(p.argmax())],
                "probability": float(p.max()),
                "probabilities": dict(zip(names, map(float, p), strict=True)),
                "scores": [float(s) for s in row],
            }
            for p, row in zip(probabilities, scores, strict=True)
        ]

    def _scores(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.network(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()

    def _prepared(self, index: int, text) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if self.picture is None:
            _refuse("this model's data set says no way to prepare a picture: send prepared pixels instead")
        try:
            content = base64.b64decode(text, validate=True)
        except (binascii.Error, TypeError, ValueError):
            _refuse(f"picture {index}: not base64 text (a PNG or JPEG file's bytes, base64-encoded)")
        try:
            with Image.open(io.BytesIO(content)) as image:
                image.load()
                return _preparation(self.picture)(image, self.shape)
        except UnidentifiedImageError:
            _refuse(f"picture {index}: not a picture (PNG, JPEG, ...)")
        except Exception as error:  # noqa: BLE001 - the preparation's own: a picture with nothing to see
            _refuse(f"picture {index}: {error}")


def _pictures(data) -> list | None:
    """The base64 pictures of a request, if it sends pictures."""
    if isinstance(data, dict) and PICTURES in data:
        return list(np.atleast_1d(data[PICTURES]))
    columns = getattr(data, "columns", None)
    if columns is not None and PICTURES in columns:
        return list(data[PICTURES])
    return None


def _pixels(data, shape: tuple[int, ...]) -> np.ndarray:
    values = data.to_numpy() if hasattr(data, "to_numpy") else data
    try:
        pixels = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        _refuse(f"send prepared pixels (numbers, of shape (N, {', '.join(map(str, shape))})) or base64 pictures "
                f"in a field named {PICTURES!r}")  # fmt: skip
    if shape and (pixels.ndim != len(shape) + 1 or tuple(pixels.shape[1:]) != shape):
        _refuse(f"pixels of shape {tuple(pixels.shape)}: this model takes (N, {', '.join(map(str, shape))})")
    if not np.isfinite(pixels).all():
        _refuse("some pixels are not numbers (NaN or infinite): pixels are numbers from 0 to 1")
    if pixels.size and (pixels.min() < 0 or pixels.max() > 1):
        _refuse(f"pixels from {pixels.min():g} to {pixels.max():g}: pixels are numbers from 0 to 1")
    return pixels


def _preparation(name: str):
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def _refuse(message: str):
    """The request's fault: MLflow's scoring server answers it with HTTP 400."""
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
