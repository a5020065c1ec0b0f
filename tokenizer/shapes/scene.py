"""The benchmark's vocabulary and the types that describe an image: shapes, colours, sizes,
grid positions and backgrounds; one object (`ShapeObject`), a whole image (`Scene`) and what a
caption asks for (`Query`); and which colour-shape pairs the training split never shows.

Geometry is in relative units: (0, 0) is the top-left corner and 1 is the image side.
"""

from dataclasses import dataclass

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


def row_col(position: str) -> tuple[int, int]:
    """The grid row and column (each 0, 1 or 2) of a position."""
    return divmod(POSITIONS.index(position), 3)


def relations(first: ShapeObject, second: ShapeObject) -> list[str]:
    """The relations from `first` to `second` that the grid makes unambiguous."""
    (row_a, col_a), (row_b, col_b) = row_col(first.position), row_col(second.position)
    found = []
    if col_a != col_b:
        found.append("left of" if col_a < col_b else "right of")
    if row_a != row_b:
        found.append("above" if row_a < row_b else "below")
    return found


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
