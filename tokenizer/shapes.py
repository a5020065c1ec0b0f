"""The built-in shapes benchmark: procedural captioned images and a checker that reads them back.

Every image shows one or two flat-coloured shapes on a plain background, drawn from a seed:
image `index` of a split is the same on every machine, so nothing is stored or downloaded.
Captions are written from the attributes, and `check` reads the attributes back from pixels,
which lets the project measure whether a generated image matches its prompt.

Geometry is in relative units: (0, 0) is the top-left corner and 1 is the image side.
"""

import io
import math
import re
from dataclasses import dataclass
from itertools import permutations
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 90, 235),
    "yellow": (235, 190, 0),
    "purple": (150, 50, 205),
    "cyan": (20, 200, 215),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (16, 16, 16)}
SIZES = {"small": 0.25, "large": 0.40}  # side of the shape's box, as a fraction of the image side
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)  # a 3x3 grid, row by row
SPLITS = ("train", "val", "test")
HELD_OUT = frozenset({("green", "triangle"), ("blue", "circle"), ("yellow", "square")})
RELATIONS = ("left of", "right of", "above", "below")  # objects[0] <relation> objects[1]

MARGIN = 0.05  # least distance from a shape's box to the image border
GAP = 0.12  # least distance between the boxes of two shapes, so blur never joins them
CELL_MARGIN = 0.07  # least distance from a shape's centre to the edge of its grid cell
SIZE_JITTER = 0.04  # the side varies by this fraction either way
AREA_FACTOR = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side**2
CENTROID_OFFSET = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}  # (centroid - centre) / side

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 256


@dataclass(frozen=True)
class ShapeObject:
    """One shape's attributes. The checker leaves a field None where it cannot read it."""

    shape: str | None
    color: str | None
    size: str | None
    position: str | None


@dataclass(frozen=True)
class Scene:
    """Everything a caption can say about an image; objects are ordered by grid position."""

    objects: tuple[ShapeObject, ...]
    background: str | None


@dataclass(frozen=True)
class ObjectQuery:
    """What a caption says about one object; None means the caption does not say."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Query:
    """A parsed caption: the objects it names, in the order it names them."""

    objects: tuple[ObjectQuery, ...]
    background: str | None = None
    relation: str | None = None  # one of RELATIONS, between objects[0] and objects[1]


class Placement(NamedTuple):
    """Where one object is drawn: its box centre and side, in relative units."""

    obj: ShapeObject
    cx: float
    cy: float
    side: float


class ShapesExample(NamedTuple):
    image: np.ndarray  # (H, W, 3) uint8
    scene: Scene
    caption: str


@dataclass
class ShapesConfig:
    image_size: int = 32
    min_objects: int = 1
    max_objects: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"shapes image_size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} px, "
                f"got {self.image_size}: set image_size in that range."
            )
        if not 1 <= self.min_objects <= self.max_objects <= 2:
            raise ValueError(
                f"shapes draws 1 or 2 objects per image, got min_objects={self.min_objects} and "
                f"max_objects={self.max_objects}: use 1 <= min_objects <= max_objects <= 2."
            )


# ---------------------------------------------------------------------------------------------
# Drawing


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


def render(placements: list[Placement], background: str, image_size: int) -> np.ndarray:
    """Draw placed objects over a plain background; returns (H, W, 3) uint8."""
    image = np.empty((image_size, image_size, 3), np.float32)
    image[:] = BACKGROUNDS[background]
    for obj, cx, cy, side in placements:
        alpha = coverage(obj.shape, cx, cy, side, image_size)[..., None]  # (H, W, 1)
        image = image * (1 - alpha) + np.asarray(COLORS[obj.color], np.float32) * alpha
    return np.round(image).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Sampling


def _row_col(position: str) -> tuple[int, int]:
    return divmod(POSITIONS.index(position), 3)


def _sample_object(rng: np.random.Generator, split: str) -> ShapeObject:
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    if split == "train":
        pairs = [pair for pair in pairs if pair not in HELD_OUT]
    color, shape = pairs[rng.integers(len(pairs))]
    size = rng.choice(list(SIZES))
    position = POSITIONS[rng.integers(len(POSITIONS))]
    return ShapeObject(shape, color, str(size), position)


def _cell_span(cell: int, side: float) -> tuple[float, float]:
    """The centre coordinates inside grid cell `cell` (0, 1, 2) that keep the box in the image."""
    low = max(cell / 3 + CELL_MARGIN, side / 2 + MARGIN)
    high = min((cell + 1) / 3 - CELL_MARGIN, 1 - side / 2 - MARGIN)
    return low, high


def _coordinate(rng: np.random.Generator, cell: int, side: float) -> float:
    """A random centre coordinate inside grid cell `cell`."""
    return float(rng.uniform(*_cell_span(cell, side)))


def draw(scene: Scene, image_size: int) -> np.ndarray:
    """A scene drawn without randomness, (H, W, 3) uint8: each object at its nominal side, in
    the middle of the centres its grid cell allows."""
    placements = []
    for obj in scene.objects:
        side = SIZES[obj.size]
        row, col = _row_col(obj.position)
        cx, cy = (sum(_cell_span(cell, side)) / 2 for cell in (col, row))
        placements.append(Placement(obj, cx, cy, side))
    return render(placements, scene.background, image_size)


def _place(rng: np.random.Generator, obj: ShapeObject) -> Placement:
    side = SIZES[obj.size] * float(rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))
    row, col = _row_col(obj.position)
    return Placement(obj, _coordinate(rng, col, side), _coordinate(rng, row, side), side)


def _apart(a: Placement, b: Placement) -> bool:
    reach = (a.side + b.side) / 2 + GAP
    return abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach


def _sample_placements(rng: np.random.Generator, split: str, count: int) -> list[Placement]:
    """Objects in distinct grid cells, far enough apart that no blur joins them."""
    while True:
        objects = [_sample_object(rng, split) for _ in range(count)]
        if len({obj.position for obj in objects}) < count:
            continue
        for _ in range(10):
            placements = [_place(rng, obj) for obj in objects]
            if count == 1 or _apart(*placements):
                return sorted(placements, key=lambda p: POSITIONS.index(p.obj.position))


def generate(config: ShapesConfig, split: str, index: int) -> ShapesExample:
    """Image `index` of `split`: the same (seed, split, index) always gives the same example."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {SPLITS}.")
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    placements = _sample_placements(rng, split, count)
    background = str(rng.choice(list(BACKGROUNDS)))
    scene = Scene(tuple(p.obj for p in placements), background)
    image = render(placements, background, config.image_size)
    return ShapesExample(image, scene, sample_caption(scene, rng))


def is_held_out(scene: Scene) -> bool:
    """Whether any object is a (color, shape) pair that the training split never shows."""
    return any((obj.color, obj.shape) in HELD_OUT for obj in scene.objects)


def attribute_combinations() -> list[Scene]:
    """Every one-object scene: shape x color x size x position x background."""
    return [
        Scene((ShapeObject(shape, color, size, position),), background)
        for shape in SHAPES
        for color in COLORS
        for size in SIZES
        for position in POSITIONS
        for background in BACKGROUNDS
    ]


# ---------------------------------------------------------------------------------------------
# Captions

_WHERE = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
_RELATION_PHRASE = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

_ONE_OBJECT = (
    "a {size} {color} {shape} {where} on a {background} background",  # the canonical phrasing
    "a {size} {color} {shape} {where}",
    "{color} {shape}, {position}, {size}",
    "there is a {size} {color} {shape} {where}",
    "a {color} {shape}, {size}, {where}, {background} background",
    "{position}: {size} {color} {shape} on {background}",
)
_TWO_OBJECTS = (
    "a {a} {relation} a {b} on a {background} background",  # the canonical phrasing
    "a {a} {relation} a {b}",
    "a {b} {inverse} a {a}",
    "a {a} {where_a} and a {b} {where_b}",
)


def _relations(first: ShapeObject, second: ShapeObject) -> list[str]:
    """The relations from `first` to `second` that the grid makes unambiguous."""
    (row_a, col_a), (row_b, col_b) = _row_col(first.position), _row_col(second.position)
    found = []
    if col_a != col_b:
        found.append("left of" if col_a < col_b else "right of")
    if row_a != row_b:
        found.append("above" if row_a < row_b else "below")
    return found


def _noun(obj: ShapeObject, with_size: bool) -> str:
    return f"{obj.size} {obj.color} {obj.shape}" if with_size else f"{obj.color} {obj.shape}"


def _one_object_caption(scene: Scene, template: str) -> str:
    (obj,) = scene.objects
    return template.format(
        size=obj.size,
        color=obj.color,
        shape=obj.shape,
        position=obj.position,
        where=_WHERE[obj.position],
        background=scene.background,
    )


def _two_object_caption(scene: Scene, template: str, swap: bool, with_size: bool) -> str:
    first, second = scene.objects[::-1] if swap else scene.objects
    relation = _relations(first, second)[0]
    return template.format(
        a=_noun(first, with_size),
        b=_noun(second, with_size),
        relation=_RELATION_PHRASE[relation],
        inverse=_RELATION_PHRASE[_INVERSE[relation]],
        where_a=_WHERE[first.position],
        where_b=_WHERE[second.position],
        background=scene.background,
    )


def canonical_caption(scene: Scene) -> str:
    """The one caption per attribute combination (used for retrieval over all combinations)."""
    if len(scene.objects) == 1:
        return _one_object_caption(scene, _ONE_OBJECT[0])
    return _two_object_caption(scene, _TWO_OBJECTS[0], swap=False, with_size=True)


def sample_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One of several phrasings, chosen by `rng`."""
    if len(scene.objects) == 1:
        return _one_object_caption(scene, _ONE_OBJECT[rng.integers(len(_ONE_OBJECT))])
    template = _TWO_OBJECTS[rng.integers(len(_TWO_OBJECTS))]
    return _two_object_caption(scene, template, bool(rng.integers(2)), bool(rng.integers(2)))


_SYNONYMS = {
    "grey": "gray",
    "centre": "center",
    "big": "large",
    "tiny": "small",
    "violet": "purple",
    "upper": "top",
    "lower": "bottom",
    "colour": "color",
}
_RELATION_PATTERN = re.compile(r"\b(?:to the )?(left|right) of\b|\b(above|below)\b")


def _words(text: str) -> list[str]:
    return [_SYNONYMS.get(word, word) for word in re.findall(r"[a-z]+", text.lower())]


def _parse_object(text: str, caption: str) -> ObjectQuery:
    words = _words(text)

    def pick(vocabulary, what: str) -> str | None:
        found = {word for word in words if word in vocabulary}
        if len(found) > 1:
            raise ValueError(
                f"caption {caption!r} names several {what}s ({sorted(found)}) for one object."
            )
        return found.pop() if found else None

    shape = pick(SHAPES, "shape")
    if shape is None:
        raise ValueError(
            f"caption {caption!r} names no shape in {text!r}: each object needs one of {SHAPES}."
        )
    row = pick(("top", "middle", "bottom"), "row")
    col = pick(("left", "center", "right"), "column")
    position = None
    if row or col:
        rows, cols = ("top", "middle", "bottom"), ("left", "center", "right")
        index = 3 * rows.index(row or "middle") + cols.index(col or "center")
        position = POSITIONS[index]
    return ObjectQuery(shape, pick(COLORS, "color"), pick(SIZES, "size"), position)


def parse_caption(caption: str) -> Query:
    """Read the attributes a caption names, in any of the phrasings `sample_caption` writes.

    Two objects are joined by a relation ("to the left of", "above", ...) or by "and".
    """
    text = caption.lower()
    background = {_SYNONYMS.get(w, w) for w in _words(text)} & set(BACKGROUNDS)
    if len(background) > 1:
        raise ValueError(f"caption {caption!r} names several backgrounds: {sorted(background)}.")
    relations = list(_RELATION_PATTERN.finditer(text))
    if len(relations) > 1:
        raise ValueError(f"caption {caption!r} has several relations; one is supported.")
    relation = None
    if relations:
        match = relations[0]
        relation = f"{match.group(1)} of" if match.group(1) else match.group(2)
        parts = [text[: match.start()], text[match.end() :]]
    else:
        parts = re.split(r"\band\b", text)
    objects = tuple(_parse_object(part, caption) for part in parts)
    return Query(objects, background.pop() if background else None, relation)


# ---------------------------------------------------------------------------------------------
# Checking

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


def _neighbours(labels: np.ndarray) -> np.ndarray:
    """(4, N, N): each pixel's up, down, left and right neighbour, 0 past the border."""
    around = np.zeros((4, *labels.shape), labels.dtype)
    around[0, 1:], around[1, :-1] = labels[:-1], labels[1:]
    around[2, :, 1:], around[3, :, :-1] = labels[:, :-1], labels[:, 1:]
    return around


def _spread_along_rows(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give every pixel of each horizontal run of `mask` the largest label in that run."""
    gapped = np.pad(mask, ((0, 0), (0, 1))).ravel()  # a False after each row ends its runs
    run = np.cumsum(~gapped)[gapped]  # run id of each masked pixel, in raster order
    values = labels[mask]
    starts = np.flatnonzero(np.diff(run, prepend=-1))
    largest = np.maximum.reduceat(values, starts)
    spread = np.zeros_like(labels)
    spread[mask] = np.repeat(largest, np.diff(np.append(starts, len(values))))
    return spread


def _components(mask: np.ndarray) -> np.ndarray:
    """Label 4-connected components of a boolean (N, N) mask: 0 outside, 1..K inside.

    Labels spread along whole row runs, then column runs, until nothing changes: a few sweeps
    for convex blobs.
    """
    if not mask.any():
        return np.zeros(mask.shape, np.int64)
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        spread = _spread_along_rows(labels, mask)
        spread = _spread_along_rows(spread.T, mask.T).T
        if np.array_equal(spread, labels):
            break
        labels = spread
    dense = np.searchsorted(np.unique(labels[mask]), labels) + 1
    return np.where(mask, dense, 0)


def _grow(labels: np.ndarray, steps: int) -> np.ndarray:
    """Grow labelled regions into unlabelled pixels; pixels two regions reach at once get -1."""
    for _ in range(steps):
        around = _neighbours(labels)
        highest = around.max(axis=0)
        lowest = np.where(around > 0, around, np.iinfo(labels.dtype).max).min(axis=0)
        free = labels == 0
        labels = np.where(free & (highest > 0) & (highest == lowest), highest, labels)
        labels = np.where(free & (highest > 0) & (highest != lowest), -1, labels)
    return labels


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


def _box_window(cx: float, cy: float, side: float) -> Window:
    """The pixels at WORK_SIZE that a box of this centre and side can touch."""

    def span(centre: float) -> tuple[int, int]:
        low = math.floor((centre - side / 2) * WORK_SIZE)
        high = math.ceil((centre + side / 2) * WORK_SIZE)
        return min(max(low, 0), WORK_SIZE - 1), min(max(high, 1), WORK_SIZE)

    (top, bottom), (left, right) = span(cy), span(cx)
    return Window(top, max(bottom, top + 1), left, max(right, left + 1))


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
        box = _box_window(mx, cy, side)
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
    labels = _components(np.linalg.norm(offset, axis=2) > FOREGROUND_DISTANCE)
    areas = np.bincount(labels.ravel())
    kept = [k for k in range(1, len(areas)) if areas[k] >= MIN_OBJECT_AREA]
    cores = np.zeros_like(labels)
    for new, old in enumerate(kept, start=1):
        cores[labels == old] = new
    regions = _grow(cores, GROW_STEPS)
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


def _object_matches(found: ShapeObject, wanted: ObjectQuery) -> bool:
    return all(
        want is None or want == have
        for want, have in (
            (wanted.shape, found.shape),
            (wanted.color, found.color),
            (wanted.size, found.size),
            (wanted.position, found.position),
        )
    )


def _relation_holds(relation: str, first: ShapeObject, second: ShapeObject) -> bool:
    return relation in _relations(first, second)


def scene_matches(scene: Scene, target: str | Scene | Query) -> bool:
    """Whether a read scene satisfies a caption, a query, or (exactly) another scene."""
    if isinstance(target, Scene):
        return scene == target
    query = parse_caption(target) if isinstance(target, str) else target
    if len(scene.objects) != len(query.objects):
        return False
    if query.background is not None and query.background != scene.background:
        return False
    for found in permutations(scene.objects):
        if not all(_object_matches(f, w) for f, w in zip(found, query.objects, strict=True)):
            continue
        if query.relation is None or _relation_holds(query.relation, found[0], found[1]):
            return True
    return False


def check_batch(images: torch.Tensor) -> list[Scene]:
    """`check` for each image of a (B, 3, H, W) batch in [-1, 1]."""
    return [check(image) for image in images]


def matches(image: ImageLike, target: str | Scene | Query) -> bool:
    """Whether an image shows what a caption (or query) says, or exactly the given scene."""
    return scene_matches(check(image), target)


# ---------------------------------------------------------------------------------------------
# Degradation


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur (sigma 1 px), noise (sigma 10/255) and JPEG (quality 75): what generated images suffer.

    Takes and returns (H, W, 3) uint8.
    """
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=1)))
    noisy = np.clip(blurred + rng.normal(0, 10, blurred.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=75)
    return np.asarray(Image.open(buffer).convert("RGB"))
