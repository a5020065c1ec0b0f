"""The caption language: captions written from a scene (one canonical phrasing, or one of several
chosen at random) and `parse_caption`, which reads any of those phrasings back into a `Query`;
`caption_layout` says where in a caption each object and the relation are named.
"""

import re
from typing import NamedTuple

import numpy as np

from tokenizer.shapes.scene import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ObjectQuery,
    Query,
    Scene,
    ShapeObject,
    relations,
)

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
    relation = relations(first, second)[0]
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


def normalised_word(word: str) -> str:
    """A lower-case word of a caption as the vocabulary spells it ("violet" -> "purple")."""
    return _SYNONYMS.get(word, word)


def _words(text: str) -> list[str]:
    return [normalised_word(word) for word in re.findall(r"[a-z]+", text.lower())]


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


class CaptionLayout(NamedTuple):
    """Where a caption names its parts, as (start, end) spans of its lower-case text."""

    objects: tuple[tuple[int, int], ...]  # each object's words, in the caption's order
    relation: str | None  # one of RELATIONS, between the first object and the second
    relation_word: tuple[int, int] | None  # "left", "right", "above" or "below"


def caption_layout(caption: str) -> CaptionLayout:
    """Split a caption into its objects: around its relation ("to the left of", "above", ...)
    or, without one, at each "and"."""
    text = caption.lower()
    relations = list(_RELATION_PATTERN.finditer(text))
    if len(relations) > 1:
        raise ValueError(f"caption {caption!r} has several relations; one is supported.")
    if relations:
        match = relations[0]
        group = 1 if match.group(1) else 2
        relation = f"{match.group(1)} of" if group == 1 else match.group(2)
        objects = ((0, match.start()), (match.end(), len(text)))
        return CaptionLayout(objects, relation, match.span(group))
    joins = list(re.finditer(r"\band\b", text))
    starts = [0] + [join.end() for join in joins]
    ends = [join.start() for join in joins] + [len(text)]
    return CaptionLayout(tuple(zip(starts, ends, strict=True)), None, None)


def parse_caption(caption: str) -> Query:
    """Read the attributes a caption names, in any of the phrasings `sample_caption` writes.

    Two objects are joined by a relation ("to the left of", "above", ...) or by "and".
    """
    text = caption.lower()
    background = {_SYNONYMS.get(w, w) for w in _words(text)} & set(BACKGROUNDS)
    if len(background) > 1:
        raise ValueError(f"caption {caption!r} names several backgrounds: {sorted(background)}.")
    layout = caption_layout(caption)
    objects = tuple(_parse_object(text[start:end], caption) for start, end in layout.objects)
    return Query(objects, background.pop() if background else None, layout.relation)
