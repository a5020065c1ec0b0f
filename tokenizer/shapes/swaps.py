"""A two-object caption's swapped twins: the same caption with one attribute exchanged between
its two objects (colour, shape or size) or with its relation turned round ("left of" <-> "right
of", "above" <-> "below"). Each twin changes exactly one thing and describes a different scene:
the hard negatives a CLIP learns relations from (NegCLIP's recipe), and the swap probe that
measures whether it did. A copy is half a swap: one object takes the other's value.
"""

import re
from typing import NamedTuple

from tokenizer.shapes.captions import (
    CaptionLayout,
    caption_layout,
    normalised_word,
    parse_caption,
)
from tokenizer.shapes.scene import COLORS, SHAPES, SIZES

SWAPS = ("color", "shape", "size", "relation")
_VOCABULARY = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES)}
_TURNED = {"left": "right", "right": "left", "above": "below", "below": "above"}


def swapped_caption(caption: str, swap: str) -> str | None:
    """`caption` (lower-cased) with one `swap` of SWAPS, or None where that swap would change
    nothing: a caption of one object, two objects with the same value of the attribute, an
    attribute the caption does not name for both, no relation ("a ... and a ..."), or a
    relation between two objects named alike.

    Raises ValueError for an unknown swap, or a caption with several relations."""
    if swap not in SWAPS:
        raise ValueError(f"swap is {swap!r}: use one of {SWAPS}.")
    text = caption.lower()
    layout = caption_layout(text)
    if len(layout.objects) != 2:
        return None
    if swap == "relation":
        first, second = parse_caption(text).objects
        if layout.relation_word is None or first == second:
            return None
        start, end = layout.relation_word
        return text[:start] + _TURNED[text[start:end]] + text[end:]
    return _exchanged(text, layout, _VOCABULARY[swap])


def swapped_twins(caption: str) -> dict[str, str]:
    """Every swap of SWAPS that changes `caption`, by name: {"color": twin, ...}."""
    twins = {swap: swapped_caption(caption, swap) for swap in SWAPS}
    return {swap: twin for swap, twin in twins.items() if twin is not None}


def copied_captions(caption: str, swap: str) -> list[str]:
    """Half of a colour, shape or size swap: `caption` (lower-cased) with one object given the
    other's value of the attribute, for each object in turn; none where `swapped_caption` would
    change nothing. Each describes a different scene from the caption's."""
    if swap not in _VOCABULARY:
        raise ValueError(f"swap is {swap!r}: use one of {tuple(_VOCABULARY)}.")
    text = caption.lower()
    layout = caption_layout(text)
    named = _two_values(text, layout, _VOCABULARY[swap]) if len(layout.objects) == 2 else None
    if named is None:
        return []
    first, second = named
    return [
        _replaced(text, [(first.words, second.value)]),
        _replaced(text, [(second.words, first.value)]),
    ]


class _Named(NamedTuple):
    words: list[re.Match]  # the words of one object that name its value of an attribute
    value: str


def _two_values(
    text: str, layout: CaptionLayout, vocabulary: tuple[str, ...]
) -> tuple[_Named, _Named] | None:
    """Each of the two objects' words naming its value of the attribute, or None unless each
    names exactly one value and the two differ."""
    first, second = (_named(text, span, vocabulary) for span in layout.objects)
    values = [{normalised_word(word.group()) for word in words} for words in (first, second)]
    if len(values[0]) != 1 or len(values[1]) != 1 or values[0] == values[1]:
        return None
    (value_a,), (value_b,) = values
    return _Named(first, value_a), _Named(second, value_b)


def _replaced(text: str, changes: list[tuple[list[re.Match], str]]) -> str:
    """`text` with each group of words replaced by its value, last words first."""
    replacements = [(word, value) for words, value in changes for word in words]
    for word, value in sorted(replacements, key=lambda pair: -pair[0].start()):
        text = text[: word.start()] + value + text[word.end() :]
    return text


def _named(text: str, span: tuple[int, int], vocabulary: tuple[str, ...]) -> list[re.Match]:
    """The words of `text[span]` that name a value of `vocabulary` (synonyms included)."""
    start, end = span
    words = re.compile(r"[a-z]+").finditer(text, start, end)
    return [word for word in words if normalised_word(word.group()) in vocabulary]


def _exchanged(text: str, layout: CaptionLayout, vocabulary: tuple[str, ...]) -> str | None:
    named = _two_values(text, layout, vocabulary)
    if named is None:
        return None
    first, second = named
    return _replaced(text, [(first.words, second.value), (second.words, first.value)])
