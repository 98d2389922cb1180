"""Pictures made from a data set's images the way users' pictures come, for the README's
examples of scripts/predict.py and for its tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def digit_pictures(digits: list[tuple[np.ndarray, int]], out_dir: Path) -> list[tuple[Path, int]]:
    """Pictures made from 28x28 MNIST digits (uint8 pixels, and their labels) the way a user's
    pictures come, in turn: a large scan, light on dark, as PNG; a photo of ink on paper, dark
    on light, as JPEG; and a wide page with the digit off to one side. Returns each picture's
    path with its digit."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for n, (pixels, label) in enumerate(digits):
        picture = Image.fromarray(pixels)
        if n % 3 == 0:
            path = out_dir / f"{label}-scan.png"
            picture.resize((112, 112), Image.Resampling.BICUBIC).save(path)
        elif n % 3 == 1:
            path = out_dir / f"{label}-photo.jpg"
            Image.fromarray(255 - np.asarray(picture.resize((200, 200), Image.Resampling.BICUBIC))).save(path)
        else:
            path = out_dir / f"{label}-page.png"
            page = Image.new("L", (300, 160), 245)
            page.paste(Image.fromarray(255 - np.asarray(picture.resize((84, 84)))), (40, 30))
            page.save(path)
        written.append((path, label))
    return written
