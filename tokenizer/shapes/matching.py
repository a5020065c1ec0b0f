"""Whether a scene, or the scene read from an image, shows what a caption or query asks for:
every named attribute of every object, the background and the relation between two objects.
"""

from itertools import permutations

from tokenizer.shapes.captions import parse_caption
from tokenizer.shapes.checker import ImageLike, check
from tokenizer.shapes.scene import ObjectQuery, Query, Scene, ShapeObject, relations


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


def relation_holds(relation: str, first: ShapeObject, second: ShapeObject) -> bool:
    """Whether `relation` (one of RELATIONS) holds from the first object to the second."""
    return relation in relations(first, second)


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
        if query.relation is None or relation_holds(query.relation, found[0], found[1]):
            return True
    return False


def matches(image: ImageLike, target: str | Scene | Query) -> bool:
    """Whether an image shows what a caption (or query) says, or exactly the given scene."""
    return scene_matches(check(image), target)
