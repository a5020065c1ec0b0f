"""Random examples drawn from a seed: image `index` of a split is the same on every machine, so
nothing is stored or downloaded. `ShapesConfig` says how large and how crowded the images are.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from tokenizer.shapes.captions import sample_caption
from tokenizer.shapes.drawing import Placement, cell_span, render
from tokenizer.shapes.scene import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    ShapeObject,
    row_col,
)

GAP = 0.12  # least distance between the boxes of two shapes, so blur never joins them
SIZE_JITTER = 0.04  # the side varies by this fraction either way
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 256


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


def _sample_object(rng: np.random.Generator, split: str) -> ShapeObject:
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    if split == "train":
        pairs = [pair for pair in pairs if pair not in HELD_OUT]
    color, shape = pairs[rng.integers(len(pairs))]
    size = rng.choice(list(SIZES))
    position = POSITIONS[rng.integers(len(POSITIONS))]
    return ShapeObject(shape, color, str(size), position)


def _coordinate(rng: np.random.Generator, cell: int, side: float) -> float:
    """A random centre coordinate inside grid cell `cell`."""
    return float(rng.uniform(*cell_span(cell, side)))


def _place(rng: np.random.Generator, obj: ShapeObject) -> Placement:
    side = SIZES[obj.size] * float(rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))
    row, col = row_col(obj.position)
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
