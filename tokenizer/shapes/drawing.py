"""Scenes to pixels: where each object's box goes, the anti-aliased coverage of a shape, the
plain-background image, and `degrade`, the blur, noise and JPEG that generated images suffer.

Geometry is in relative units: (0, 0) is the top-left corner and 1 is the image side.
"""

import io
import math
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter

from tokenizer.shapes.scene import BACKGROUNDS, COLORS, SHAPES, SIZES, Scene, ShapeObject, row_col

MARGIN = 0.05  # least distance from a shape's box to the image border
CELL_MARGIN = 0.07  # least distance from a shape's centre to the edge of its grid cell
AREA_FACTOR = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side**2
CENTROID_OFFSET = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}  # (centroid - centre) / side


class Placement(NamedTuple):
    """Where one object is drawn: its box centre and side, in relative units."""

    obj: ShapeObject
    cx: float
    cy: float
    side: float


class Window(NamedTuple):
    """Pixel rows [top, bottom) and columns [left, right) of an image."""

    top: int
    bottom: int
    left: int
    right: int


def coverage(
    shape: str,
    cx: float,
    cy: float,
    side: float,
    size: int,
    supersample: int = 4,
    window: Window | None = None,
) -> np.ndarray:
    """Fraction of each pixel of a (size, size) image covered by the shape, in [0, 1].

    The shape's box has centre (cx, cy) and the given side; a triangle points up and fills its
    box's full width at the bottom. Supersampling gives anti-aliased, sub-pixel exact edges.
    With a window, only that part of the image is computed.
    """
    top, bottom, left, right = window or Window(0, size, 0, size)
    steps = (np.arange(supersample, dtype=np.float32) + 0.5) / supersample
    ys = ((np.arange(top, bottom)[:, None] + steps).ravel() / size)[:, None] - cy  # (h*s, 1)
    xs = ((np.arange(left, right)[:, None] + steps).ravel() / size)[None, :] - cx  # (1, w*s)
    half = side / 2
    if shape == "circle":
        inside = xs * xs + ys * ys <= half * half
    elif shape == "square":
        inside = (np.abs(xs) <= half) & (np.abs(ys) <= half)
    elif shape == "triangle":
        depth = (ys + half) / side  # 0 at the apex, 1 at the base
        inside = (depth >= 0) & (depth <= 1) & (np.abs(xs) <= half * depth)
    else:
        raise ValueError(f"unknown shape {shape!r}: use one of {SHAPES}.")
    h, w = bottom - top, right - left
    return inside.reshape(h, supersample, w, supersample).mean(axis=(1, 3))  # (h, w)


def box_window(cx: float, cy: float, side: float, size: int) -> Window:
    """The pixels of a (size, size) image that a box of this centre and side can touch."""

    def span(centre: float) -> tuple[int, int]:
        low = math.floor((centre - side / 2) * size)
        high = math.ceil((centre + side / 2) * size)
        return min(max(low, 0), size - 1), min(max(high, 1), size)

    (top, bottom), (left, right) = span(cy), span(cx)
    return Window(top, max(bottom, top + 1), left, max(right, left + 1))


def render(placements: list[Placement], background: str, image_size: int) -> np.ndarray:
    """Draw placed objects over a plain background; returns (H, W, 3) uint8. Each object is
    computed over its box's pixels only: it covers nothing outside them."""
    image = np.empty((image_size, image_size, 3), np.float64)
    image[:] = BACKGROUNDS[background]
    for obj, cx, cy, side in placements:
        window = box_window(cx, cy, side, image_size)
        alpha = coverage(obj.shape, cx, cy, side, image_size, window=window)[..., None]
        box = image[window.top : window.bottom, window.left : window.right]  # (h, w, 3)
        box[:] = box * (1 - alpha) + np.asarray(COLORS[obj.color], np.float32) * alpha
    return np.round(image).astype(np.uint8)


def cell_span(cell: int, side: float) -> tuple[float, float]:
    """The centre coordinates inside grid cell `cell` (0, 1, 2) that keep the box in the image."""
    low = max(cell / 3 + CELL_MARGIN, side / 2 + MARGIN)
    high = min((cell + 1) / 3 - CELL_MARGIN, 1 - side / 2 - MARGIN)
    return low, high


def draw(scene: Scene, image_size: int) -> np.ndarray:
    """A scene drawn without randomness, (H, W, 3) uint8: each object at its nominal side, in
    the middle of the centres its grid cell allows."""
    placements = []
    for obj in scene.objects:
        side = SIZES[obj.size]
        row, col = row_col(obj.position)
        cx, cy = (sum(cell_span(cell, side)) / 2 for cell in (col, row))
        placements.append(Placement(obj, cx, cy, side))
    return render(placements, scene.background, image_size)


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur (sigma 1 px), noise (sigma 10/255) and JPEG (quality 75): what generated images suffer.

    Takes and returns (H, W, 3) uint8.
    """
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=1)))
    noisy = np.clip(blurred + rng.normal(0, 10, blurred.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=75)
    return np.asarray(Image.open(buffer).convert("RGB"))
