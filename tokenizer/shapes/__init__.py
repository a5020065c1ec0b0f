"""The built-in shapes benchmark: procedural captioned images and a checker that reads them back.

Every image shows one or two flat-coloured shapes on a plain background, drawn from a seed:
image `index` of a split is the same on every machine, so nothing is stored or downloaded.
Captions are written from the attributes, and `check` reads the attributes back from pixels,
which lets the project measure whether a generated image matches its prompt.

- `scene`: the vocabulary, the Scene and Query types, the held-out colour-shape pairs
- `drawing`: scenes to pixels, and the degradation generated images suffer
- `sampling`: `generate`, the seeded examples of each split, and `ShapesConfig`
- `captions`: captions written from scenes, and `parse_caption`
- `regions`: connected regions of a mask, for the checker
- `checker`: `check`, reading scenes back from pixels
- `matching`: whether a scene or an image shows what a caption asks for
"""

from tokenizer.shapes.captions import canonical_caption, parse_caption, sample_caption
from tokenizer.shapes.checker import check, check_batch
from tokenizer.shapes.drawing import degrade, draw
from tokenizer.shapes.matching import matches, relation_holds, scene_matches
from tokenizer.shapes.sampling import ShapesConfig, ShapesExample, generate
from tokenizer.shapes.scene import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    ObjectQuery,
    Query,
    Scene,
    ShapeObject,
    attribute_combinations,
    is_held_out,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "HELD_OUT",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "ObjectQuery",
    "Query",
    "Scene",
    "ShapeObject",
    "ShapesConfig",
    "ShapesExample",
    "attribute_combinations",
    "canonical_caption",
    "check",
    "check_batch",
    "degrade",
    "draw",
    "generate",
    "is_held_out",
    "matches",
    "relation_holds",
    "parse_caption",
    "sample_caption",
    "scene_matches",
]
