"""A user's picture of one thing, prepared as a data set's images were: for scripts/predict.py,
and for a served model (machinery/tracking/served_model.py), which carries a copy of this file.
It imports NumPy, Pillow and SciPy alone, so that the copy works wherever the model is served.

Each function takes a Pillow image and the shape of one of the data set's images (channels,
height, width), and returns a float32 array of that shape, pixels in [0, 1]:

- digit: as LeCun describes his handwritten digits, each "size normalized to fit in a 20x20 pixel box
  while preserving [its] aspect ratio" and "centered in a 28x28 image by computing the center
  of mass of the pixels": the digit light on a dark background;
- garment: as Zalando describes its 28x28 photos of clothes, each product photo trimmed, its longest edge
  resized to 28, the rest filled, and its colours negated (a light garment on black);
- resized: as a folder's pictures were read (machinery/data/image_folders.py, with to_array),
  resized to the size and converted to the channels.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

SIDE, DIGIT_BOX = 28, 20
# Ink below this share of the strongest is paper: grain, JPEG noise.
PAPER = 0.2
# Ink above this share of the strongest is a stroke; strokes of at least NEAR_ITS_SIZE of the
# largest one's area belong to the thing (a 5's flag, a 7's bar).
STROKE, NEAR_ITS_SIZE = 0.35, 0.2
# Around each point, more of the picture is paper than ink.
BACKGROUND_PERCENTILE = 70


def to_array(picture, size: tuple[int, int], channels: int) -> np.ndarray:
    """One picture (a path, or a Pillow image) as uint8 of shape (channels, height, width):
    turned upright by its EXIF orientation, converted as torchvision's loader converts (RGB, or
    grey), and resized to ``size`` (width, height) with antialiasing."""
    with contextlib.ExitStack() as stack:
        image = stack.enter_context(Image.open(picture)) if isinstance(picture, (str, os.PathLike)) else picture
        image.draft("L" if channels == 1 else "RGB", size)  # a JPEG decodes straight to near the size wanted
        image = ImageOps.exif_transpose(image).convert("L" if channels == 1 else "RGB")
        if image.size != tuple(size):
            image = image.resize(tuple(size), Image.Resampling.BILINEAR)
        array = np.array(image, dtype=np.uint8)  # a copy torch may write
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def digit(image: Image.Image, dims: tuple[int, ...] = (1, SIDE, SIDE)) -> np.ndarray:
    # A digit's strokes cover little of its picture: most of it is the ground, whatever the edges.
    thing = _thing(image, "no digit stands out from the background", ground=np.median)
    return _center_of_mass_to_middle(_fit(thing, DIGIT_BOX))[None]


def garment(image: Image.Image, dims: tuple[int, ...] = (1, SIDE, SIDE)) -> np.ndarray:
    # A garment may fill most of its photo: the photo's edges are the ground.
    return _fit(_thing(image, "no garment stands out from the background", ground=_edges_median), SIDE)[None]


def resized(image: Image.Image, dims: tuple[int, ...]) -> np.ndarray:
    channels, height, width = dims
    return to_array(image, (width, height), channels).astype(np.float32) / 255


def _thing(image: Image.Image, nothing: str, ground) -> np.ndarray:
    """How strongly each point of the picture is ink, in [0, 1], cropped to the thing.

    A photo of paper is lit unevenly: a shadow across the page, a dark desk at its edges. So the
    paper's own brightness is estimated around every point (BACKGROUND_PERCENTILE of a quarter of
    the picture around it: more paper than ink), and ink is how much darker than that a point
    is. The thing is the largest stroke that does not touch the picture's edge (a desk, a
    shadow's border, a page's corner do), with the strokes near its size: every dark pixel at
    the border is not the thing."""
    gray = _gray(image)
    if ground(gray) < 0.5:  # light strokes on a dark ground (a scan, a screen): as ink on paper
        gray = 1 - gray
    ink = np.clip(1 - gray / np.maximum(_paper(gray), 1e-3), 0, 1)
    if ink.max() < 0.1:
        raise ValueError(nothing)
    level = ink / ink.max()
    strokes, count = ndimage.label(level > STROKE)
    sizes = ndimage.sum(level > STROKE, strokes, range(1, count + 1))
    edge = set(np.concatenate([strokes[0], strokes[-1], strokes[:, 0], strokes[:, -1]]).tolist()) - {0}
    candidates = [i for i in range(1, count + 1) if i not in edge] or list(range(1, count + 1))
    largest = max(sizes[i - 1] for i in candidates)
    kept = [i for i in candidates if sizes[i - 1] >= NEAR_ITS_SIZE * largest]
    near = ndimage.binary_dilation(np.isin(strokes, kept), iterations=2)  # the strokes' soft edges with them
    level = np.where(near & (level >= PAPER), level, 0)
    rows, cols = np.nonzero(level)
    return level[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _edges_median(gray: np.ndarray) -> float:
    return float(np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])))


def _paper(gray: np.ndarray, side: int = 48) -> np.ndarray:
    """The paper's brightness around every point, from a small copy of the picture."""
    height, width = gray.shape
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BOX), dtype=np.float32)
    paper = ndimage.percentile_filter(small, BACKGROUND_PERCENTILE, size=side // 4 + 1, mode="nearest")
    paper = ndimage.uniform_filter(paper, 3, mode="nearest")
    return np.asarray(Image.fromarray(paper).resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


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


def _center_of_mass_to_middle(canvas: np.ndarray) -> np.ndarray:
    """Shift by whole pixels so that the centre of mass lands on (14, 14), as LeCun's digits were
    centred in their 28x28 field by their centre of mass."""
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
