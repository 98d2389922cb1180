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


def paper_photos(digits: list[tuple[np.ndarray, int]], out_dir: Path, seed: int = 0) -> list[tuple[Path, int]]:
    """Photos of each digit written in ink on paper, lit as paper on a desk is: one with a soft
    shadow across the left of the page, one with the dark desk along two edges of the picture.
    Returns each picture's path with its digit."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for pixels, label in digits:
        big = np.asarray(Image.fromarray(pixels).resize((160, 160), Image.Resampling.BICUBIC), np.float32)
        page = np.full((240, 240), 235.0)
        page[40:200, 40:200] -= big * 0.85  # dark ink on light paper
        across = np.linspace(0, 1, 240)[None, :]
        shade = 0.45 + 0.55 / (1 + np.exp(-(across - 0.5) * 25))  # darker by more than half, on the left
        shadowed = (page * shade + rng.normal(0, 4, page.shape)).clip(0, 255).astype(np.uint8)
        written.append((out_dir / f"{label}-shadow.jpg", label))
        Image.fromarray(shadowed).save(written[-1][0])
        big = np.asarray(Image.fromarray(pixels).resize((140, 140), Image.Resampling.BICUBIC), np.float32)
        desk = np.full((260, 260), 225.0)
        desk[70:210, 80:220] -= big * 0.8
        desk[:45, :], desk[:, :35] = 50, 45  # the desk, dark, along the top and the left
        written.append((out_dir / f"{label}-desk.jpg", label))
        Image.fromarray((desk + rng.normal(0, 5, desk.shape)).clip(0, 255).astype(np.uint8)).save(written[-1][0])
    return written
