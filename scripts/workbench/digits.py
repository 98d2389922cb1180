"""A folder of real pictures that nobody here made: scikit-learn's copy of the UCI handwritten
digits (1,797 grey 8x8 pictures, shipped inside scikit-learn, nothing downloaded), written as
an ImageFolder: ``train/<digit>/N.png`` and ``test/<digit>/N.png``, a fixed fifth held out for
the test. What a user's own small folder looks like to tune.py, for the tests and the
measurements of docs/objectives.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TEST_SHARE = 0.2
SEED = 0


def export_digits(root: Path, count: int | None = None) -> Path:
    """Write the digits (the first ``count`` of a fixed shuffle, or all) under ``root``; return it."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(SEED).permutation(len(digits.target))[:count]
    held = round(len(order) * TEST_SHARE)
    for i, index in enumerate(order):
        split = "test" if i < held else "train"
        folder = root / split / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[index] * 255 / 16).round().astype(np.uint8)  # 0..16 in the data set
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return root
