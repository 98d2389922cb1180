"""A user's picture of one thing, prepared as a data set's images were, for scripts/predict.py.

Each function takes a Pillow image and the shape of one of the data set's images (channels,
height, width), and returns a float32 array of that shape, pixels in [0, 1]:

- digit: as LeCun describes MNIST, each digit "size normalized to fit in a 20x20 pixel box
  while preserving [its] aspect ratio" and "centered in a 28x28 image by computing the center
  of mass of the pixels": the digit light on a dark background;
- garment: as Zalando describes Fashion-MNIST, each product photo trimmed, its longest edge
  resized to 28, the rest filled, and its colours negated (a light garment on black);
- resized: as a folder's pictures were read, resized to the size and converted to the
  channels (machinery/image_folders.py).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from machinery.image_folders import to_array

SIDE, DIGIT_BOX = 28, 20
# Ink below this share of the darkest-to-lightest range is paper: grain, shadows, JPEG noise.
PAPER = 0.2


def digit(image: Image.Image, dims: tuple[int, ...] = (1, SIDE, SIDE)) -> np.ndarray:
    thing = _thing(image, "no digit stands out from the background")
    return _center_of_mass_to_middle(_fit(thing, DIGIT_BOX))[None]


def garment(image: Image.Image, dims: tuple[int, ...] = (1, SIDE, SIDE)) -> np.ndarray:
    return _fit(_thing(image, "no garment stands out from the background"), SIDE)[None]


def resized(image: Image.Image, dims: tuple[int, ...]) -> np.ndarray:
    channels, height, width = dims
    return to_array(image, (width, height), channels).astype(np.float32) / 255


def _thing(image: Image.Image, nothing: str) -> np.ndarray:
    """The picture in gray, the thing light on a dark background, cropped to the thing."""
    gray = _gray(image)
    if np.median(_border(gray)) > 0.5:  # dark on light paper: make it light on dark
        gray = 1 - gray
    background, ink = np.median(_border(gray)), gray.max()
    if ink - background < 0.1:
        raise ValueError(nothing)
    level = np.clip((gray - background) / (ink - background), 0, 1)
    level[level < PAPER] = 0
    rows, cols = np.nonzero(level)
    return level[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _gray(image: Image.Image) -> np.ndarray:
    """Gray levels in [0, 1]. A transparent background (a drawing saved from a browser's canvas:
    black ink, and alpha 0 around it) is filled with the colour that sets the ink apart."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255
        gray = np.asarray(rgba.convert("L"), dtype=np.float32) / 255
        if alpha.min() < 1 and alpha.sum() > 0:
            ink = (gray * alpha).sum() / alpha.sum()
            return gray * alpha + (1.0 if ink < 0.5 else 0.0) * (1 - alpha)
        return gray
    return np.asarray(image.convert("L"), dtype=np.float32) / 255


def _fit(thing: np.ndarray, box: int) -> np.ndarray:
    """``thing`` scaled to fit a box x box square, its shape kept, in the middle of 28x28."""
    scale = box / max(thing.shape)
    size = (max(1, round(thing.shape[1] * scale)), max(1, round(thing.shape[0] * scale)))
    small = np.asarray(Image.fromarray(thing).resize(size, Image.Resampling.LANCZOS), dtype=np.float32).clip(0, 1)
    canvas = np.zeros((SIDE, SIDE), dtype=np.float32)
    top, left = (SIDE - small.shape[0]) // 2, (SIDE - small.shape[1]) // 2
    canvas[top : top + small.shape[0], left : left + small.shape[1]] = small
    return canvas


def _border(pixels: np.ndarray) -> np.ndarray:
    """The outermost rows and columns: the paper, in a picture of one thing."""
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def _center_of_mass_to_middle(canvas: np.ndarray) -> np.ndarray:
    """Shift by whole pixels so that the centre of mass lands on (14, 14), as in MNIST (its
    digits' centres of mass, measured, lie within half a pixel of it)."""
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
