"""A photo or scan of one handwritten digit, prepared as MNIST's digits were: grayscale, a light
digit on a dark background, the digit scaled to fit a 20x20 box (its shape kept) and placed in
a 28x28 image so that its centre of mass is the centre.

LeCun's description of MNIST: "the images were centered in a 28x28 image by computing the
center of mass of the pixels, and translating the image so as to position this point at the
center of the 28x28 field", after each digit was "size normalized to fit in a 20x20 pixel box
while preserving [its] aspect ratio".
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIDE, BOX = 28, 20
# Ink below this share of the darkest-to-lightest range is paper: grain, shadows, JPEG noise.
PAPER = 0.2


def prepare(image: Image.Image) -> np.ndarray:
    """float32 pixels in [0, 1], shaped (28, 28): the digit bright, the background 0."""
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255
    if np.median(_border(gray)) > 0.5:  # dark ink on light paper: turn it into light on dark
        gray = 1 - gray
    background, ink = np.median(_border(gray)), gray.max()
    if ink - background < 0.1:
        raise ValueError("no digit stands out from the background")
    level = np.clip((gray - background) / (ink - background), 0, 1)
    level[level < PAPER] = 0
    rows, cols = np.nonzero(level)
    digit = level[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]

    scale = BOX / max(digit.shape)
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    small = np.asarray(Image.fromarray(digit).resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    small = small.clip(0, 1)

    canvas = np.zeros((SIDE, SIDE), dtype=np.float32)
    top, left = (SIDE - small.shape[0]) // 2, (SIDE - small.shape[1]) // 2
    canvas[top : top + small.shape[0], left : left + small.shape[1]] = small
    return _center_of_mass_to_middle(canvas)


def _border(pixels: np.ndarray) -> np.ndarray:
    """The outermost rows and columns: the paper, in a picture of one digit."""
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def _center_of_mass_to_middle(canvas: np.ndarray) -> np.ndarray:
    """Shift the digit by whole pixels so that its centre of mass lands on (14, 14), as in MNIST
    (its digits' centres of mass, measured, lie within half a pixel of it)."""
    rows, cols = np.indices(canvas.shape)
    total = canvas.sum()
    shift_rows = round(SIDE / 2 - (rows * canvas).sum() / total)
    shift_cols = round(SIDE / 2 - (cols * canvas).sum() / total)
    moved = np.zeros_like(canvas)
    src_r = slice(max(0, -shift_rows), min(SIDE, SIDE - shift_rows))
    src_c = slice(max(0, -shift_cols), min(SIDE, SIDE - shift_cols))
    dst_r = slice(max(0, shift_rows), min(SIDE, SIDE + shift_rows))
    dst_c = slice(max(0, shift_cols), min(SIDE, SIDE + shift_cols))
    moved[dst_r, dst_c] = canvas[src_r, src_c]
    return moved
