"""Reading a scene back from pixels: `check` gives the attributes an image shows.

`check` resizes any image to WORK_SIZE, finds each object against the backdrop, names its
colour from the palette, fits each shape's blurred template to it, and places it on the grid.
Pixels that look like no shape give objects with None fields, so they never match a caption.
"""

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tokenizer.shapes.drawing import AREA_FACTOR, CENTROID_OFFSET, box_window, coverage
from tokenizer.shapes.regions import components, grow
from tokenizer.shapes.scene import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
)

WORK_SIZE = 64  # the checker reads every image at this resolution
FOREGROUND_DISTANCE = 0.25  # RGB distance (in [0, 1] units) from the background that is a shape
MIN_OBJECT_AREA = 25  # pixels at WORK_SIZE; the smallest shape covers about 120
COLOR_TOLERANCE = 0.2  # RGB distance in [0, 1] units past which a colour reads as None
PAINT_SCALE = (0.6, 1.2)  # how faint or strong a shape's colour may be and still be named
MAX_FIT_ERROR = 0.3  # template misfit per unit of shape area above which the shape reads as None
CHROMA_WEIGHT = 0.25  # JPEG keeps chroma coarser and noisier than luma, so it counts less
GROW_STEPS = 8  # pixels an object's region reaches past its core, to catch blurred edges
BLUR_SIGMAS = (0.0, 0.6, 1.2, 1.8, 2.4, 3.0, 3.6)  # pixels at WORK_SIZE, tried for every template
SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])

_PALETTE = np.array(list(COLORS.values()), np.float32) / 255  # (6, 3)
_BACKDROPS = np.array(list(BACKGROUNDS.values()), np.float32) / 255  # (2, 3)


def _blur_matrices() -> np.ndarray:
    """(S, N, N) row-normalised Gaussian matrices: G @ X @ G.T blurs an (N, N) image."""
    offsets = np.arange(WORK_SIZE)[:, None] - np.arange(WORK_SIZE)[None, :]
    matrices = []
    for sigma in BLUR_SIGMAS:
        if sigma == 0:
            matrices.append(np.eye(WORK_SIZE, dtype=np.float32))
            continue
        weights = np.exp(-0.5 * (offsets / sigma) ** 2)
        matrices.append((weights / weights.sum(axis=1, keepdims=True)).astype(np.float32))
    return np.stack(matrices)


_BLUR = _blur_matrices()
_YCBCR = np.array(
    [[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]], np.float32
)  # RGB -> (Y, Cb, Cr) without the offsets: luma first, then the two chroma channels


ImageLike = torch.Tensor | np.ndarray | Image.Image


def to_float_image(image: ImageLike) -> np.ndarray:
    """A tensor (3, H, W) in [-1, 1] (or uint8), a PIL image, or a numpy array (H, W[, C]),
    uint8 or float in [0, 1], as (H, W, 3) float32 in [0, 1]."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), np.float32) / 255
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
            raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}.")
        tensor = tensor.float() / 255 if tensor.dtype == torch.uint8 else (tensor.float() + 1) / 2
        array = tensor.expand(3, -1, -1).permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        array = image.astype(np.float32) / 255 if image.dtype == np.uint8 else image
        array = array.astype(np.float32)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ValueError(f"expected an (H, W, 3) array, got shape {image.shape}.")
        array = array[..., :3]
    else:
        raise TypeError(
            f"cannot check a {type(image).__name__}: pass a tensor, PIL image or array."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError("cannot check an empty image.")
    return np.clip(array, 0, 1)


def _resize(array: np.ndarray) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    tensor = F.interpolate(tensor, size=(WORK_SIZE, WORK_SIZE), mode="bilinear", antialias=True)
    return tensor[0].permute(1, 2, 0).numpy()  # (N, N, 3)


def _background_name(backdrop: np.ndarray) -> str | None:
    distances = np.linalg.norm(_BACKDROPS - backdrop, axis=1)  # (2,)
    best = int(distances.argmin())
    return list(BACKGROUNDS)[best] if distances[best] <= COLOR_TOLERANCE else None


def _paint_name(paint: np.ndarray, backdrop: np.ndarray) -> str | None:
    """The palette colour whose offset from the background best explains `paint`.

    A small blurred shape never reaches its full colour, so each palette offset may be scaled
    (within PAINT_SCALE) before it is compared.
    """
    offsets = _PALETTE - backdrop  # (6, 3)
    scale = np.clip(offsets @ paint / (offsets * offsets).sum(axis=1), *PAINT_SCALE)  # (6,)
    residuals = np.linalg.norm(paint - scale[:, None] * offsets, axis=1)  # (6,)
    best = int(residuals.argmin())
    return list(COLORS)[best] if residuals[best] <= COLOR_TOLERANCE else None


class _Fit(NamedTuple):
    shape: str | None
    cx: float
    cy: float
    side: float


def _fit_shape(offset: np.ndarray, paint: np.ndarray, region: np.ndarray) -> _Fit:
    """Fit each shape's template to one object and keep the best.

    `offset` is the image minus the background and `paint` the object's colour minus the
    background. Blur preserves a shape's area and centroid, so those give each template's box
    to sub-pixel precision. The template, blurred at a few widths, is then compared with the
    image in luma and in chroma separately, because JPEG blurs chroma more than luma; the shape
    whose best blurred templates leave the least squared error wins.
    """
    coverage_map = offset @ paint / max(float(paint @ paint), 1e-6)  # (N, N), unclipped
    weights = np.where(region, coverage_map, 0.0)
    area = weights.sum()
    if area < MIN_OBJECT_AREA / 2:
        return _Fit(None, 0.5, 0.5, 0.0)
    grid = (np.arange(WORK_SIZE) + 0.5) / WORK_SIZE
    mx, my = (weights.sum(axis=0) @ grid) / area, (weights.sum(axis=1) @ grid) / area
    rows, cols = np.nonzero(region)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    inside = region[r0:r1, c0:c1, None]  # (h, w, 1)
    target = offset[r0:r1, c0:c1] @ _YCBCR.T  # (h, w, 3)
    ink = paint @ _YCBCR.T  # (3,)
    contrast = float(ink[0] ** 2 + CHROMA_WEIGHT * ink[1:] @ ink[1:])
    fits, errors = [], []
    for shape in SHAPES:
        side = math.sqrt(area / AREA_FACTOR[shape]) / WORK_SIZE
        cy = my - CENTROID_OFFSET[shape] * side
        box = box_window(mx, cy, side, WORK_SIZE)
        template = coverage(shape, mx, cy, side, WORK_SIZE, window=box).astype(np.float32)
        down = _BLUR[:, r0:r1, box.top : box.bottom]  # (S, h, box rows)
        across = _BLUR[:, c0:c1, box.left : box.right]  # (S, w, box cols)
        blurred = down @ template @ across.transpose(0, 2, 1)  # (S, h, w)
        residual = ((target - blurred[..., None] * ink) ** 2 * inside).sum(axis=(1, 2))  # (S, 3)
        error = residual[:, 0].min() + CHROMA_WEIGHT * residual[:, 1:].sum(axis=1).min()
        fits.append(_Fit(shape, float(mx), float(cy), side))
        errors.append(error / (area * contrast))
    best = int(np.argmin(errors))
    return fits[best] if errors[best] <= MAX_FIT_ERROR else fits[best]._replace(shape=None)


def _position(cx: float, cy: float) -> str:
    row, col = (min(max(int(v * 3), 0), 2) for v in (cy, cx))
    return POSITIONS[3 * row + col]


def _read(image: np.ndarray) -> Scene:
    """The scene in an (N, N, 3) float image at WORK_SIZE."""
    border = np.concatenate([image[:2], image[-2:], image[:, :2], image[:, -2:]], axis=None)
    backdrop = np.median(border.reshape(-1, 3), axis=0)  # (3,)
    offset = image - backdrop  # (N, N, 3)
    labels = components(np.linalg.norm(offset, axis=2) > FOREGROUND_DISTANCE)
    areas = np.bincount(labels.ravel())
    kept = [k for k in range(1, len(areas)) if areas[k] >= MIN_OBJECT_AREA]
    cores = np.zeros_like(labels)
    for new, old in enumerate(kept, start=1):
        cores[labels == old] = new
    regions = grow(cores, GROW_STEPS)
    objects = []
    for k in range(1, len(kept) + 1):
        core = cores == k
        strength = np.linalg.norm(offset[core], axis=1)  # (P,)
        solid = offset[core][strength >= 0.8 * np.quantile(strength, 0.9)]  # (Q, 3)
        paint = np.median(solid, axis=0)  # the shape's colour minus the background, (3,)
        color = _paint_name(paint, backdrop)
        if color is not None:  # blur dilutes a small shape's core, so trust the palette
            paint = _PALETTE[list(COLORS).index(color)] - backdrop
        fit = _fit_shape(offset, paint, regions == k)
        size = "large" if fit.side >= SIZE_THRESHOLD else "small"
        objects.append(ShapeObject(fit.shape, color, size, _position(fit.cx, fit.cy)))
    objects.sort(key=lambda obj: POSITIONS.index(obj.position))
    return Scene(tuple(objects), _background_name(backdrop))


def check(image: ImageLike) -> Scene:
    """Read the scene's attributes back from an image of any size.

    Accepts a (3, H, W) tensor in [-1, 1], a PIL image, or an (H, W, 3) uint8 array. Pixels that
    look like no shape give objects with None fields or an unexpected object count, so they
    never match a caption.
    """
    return _read(_resize(to_float_image(image)))


def check_batch(images: torch.Tensor) -> list[Scene]:
    """`check` for each image of a (B, 3, H, W) batch in [-1, 1]."""
    return [check(image) for image in images]
