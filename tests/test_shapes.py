"""The shapes benchmark: determinism, held-out combinations, captions, and the checker."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer.shapes import (
    HELD_OUT,
    SIZES,
    SPLITS,
    Query,
    Scene,
    ShapeObject,
    ShapesConfig,
    attribute_combinations,
    canonical_caption,
    check,
    degrade,
    draw,
    generate,
    is_held_out,
    matches,
    parse_caption,
    sample_caption,
    scene_matches,
)
from tokenizer.shapes.drawing import Placement, coverage, render
from tokenizer.shapes.scene import BACKGROUNDS, COLORS, SHAPES
from tokenizer.shapes.swaps import SWAPS, copied_captions, swapped_caption, swapped_twins


def _accuracy(split: str, objects: int, count: int, degraded: bool, image_size: int = 32) -> float:
    config = ShapesConfig(image_size=image_size, min_objects=objects, max_objects=objects)
    correct = 0
    for index in range(count):
        example = generate(config, split, index)
        image = example.image
        if degraded:
            image = degrade(image, np.random.default_rng([objects, index]))
        correct += check(image) == example.scene
    return correct / count


@pytest.mark.parametrize("objects", [1, 2])
@pytest.mark.parametrize("split", SPLITS)
def test_checker_reads_clean_and_degraded_images_of_every_split(split, objects):
    assert _accuracy(split, objects, 40, degraded=False) >= 0.995
    assert _accuracy(split, objects, 40, degraded=True) >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("objects", [1, 2])
@pytest.mark.parametrize("split", SPLITS)
def test_checker_accuracy_bar_on_2000_images(split, objects, image_size):
    assert _accuracy(split, objects, 2000, degraded=False, image_size=image_size) >= 0.995
    assert _accuracy(split, objects, 2000, degraded=True, image_size=image_size) >= 0.99


def test_same_index_gives_same_example_and_splits_differ():
    config = ShapesConfig(image_size=32)
    first, again = generate(config, "train", 7), generate(config, "train", 7)
    assert np.array_equal(first.image, again.image) and first.caption == again.caption
    assert not np.array_equal(first.image, generate(config, "val", 7).image)
    other_seed = generate(dataclasses.replace(config, seed=1), "train", 7)
    assert not np.array_equal(first.image, other_seed.image)


def test_held_out_combinations_never_occur_in_training():
    config = ShapesConfig(image_size=32, min_objects=1, max_objects=2)
    train = [generate(config, "train", i).scene for i in range(600)]
    test = [generate(config, "test", i).scene for i in range(600)]
    assert not any(is_held_out(scene) for scene in train)
    pairs_in_test = {(o.color, o.shape) for scene in test for o in scene.objects}
    assert pairs_in_test >= HELD_OUT  # they exist, so generalisation can be measured


def test_every_phrasing_parses_back_to_its_scene():
    config = ShapesConfig(image_size=32, min_objects=1, max_objects=2)
    phrasings = set()
    for index in range(40):
        scene = generate(config, "val", index).scene
        for seed in range(8):
            caption = sample_caption(scene, np.random.default_rng(seed))
            phrasings.add(caption)
            assert scene_matches(scene, caption), caption
    assert len(phrasings) > 100


def test_a_changed_attribute_breaks_the_match():
    scene = Scene((ShapeObject("circle", "red", "large", "top left"),), "white")
    assert scene_matches(scene, "a large red circle in the top left on a white background")
    assert not scene_matches(scene, "a small red circle in the top left")
    assert not scene_matches(scene, "a large blue circle in the top left")
    assert not scene_matches(scene, "a large red square in the top left")
    assert not scene_matches(scene, "a large red circle at the bottom")
    assert not scene_matches(scene, "a red circle on a black background")
    assert not scene_matches(scene, "a red circle to the left of a blue square")
    assert scene_matches(scene, "red circle")  # a caption that says less still matches


def test_canonical_captions_name_each_combination_once():
    scenes = attribute_combinations()
    captions = [canonical_caption(scene) for scene in scenes]
    assert len(set(captions)) == len(scenes) == 3 * 6 * len(SIZES) * 9 * 2
    for scene, caption in zip(scenes[::37], captions[::37], strict=True):
        matching = [other for other in scenes if scene_matches(other, caption)]
        assert matching == [scene]


def test_relations_are_checked_from_pixels():
    config = ShapesConfig(image_size=64, min_objects=2, max_objects=2)
    example = generate(config, "test", 3)
    first, second = example.scene.objects
    true = parse_caption(canonical_caption(example.scene)).relation
    inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    phrase = {"left of": "to the left of", "right of": "to the right of"}
    a, b = f"{first.color} {first.shape}", f"{second.color} {second.shape}"
    assert matches(example.image, f"a {a} {phrase.get(true, true)} a {b}")
    wrong = inverse[true]
    assert not matches(example.image, f"a {a} {phrase.get(wrong, wrong)} a {b}")


def test_checker_accepts_tensor_pil_and_array_and_other_sizes():
    example = generate(ShapesConfig(image_size=32, min_objects=2, max_objects=2), "val", 5)
    tensor = torch.from_numpy(example.image).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
    assert check(tensor) == check(Image.fromarray(example.image)) == example.scene
    for image_size in (48, 128, 256):
        big = generate(ShapesConfig(image_size=image_size), "val", 11)
        assert check(big.image) == big.scene


def test_checker_degrades_gracefully_on_garbage():
    rng = np.random.default_rng(0)
    caption = "a large red circle in the center on a white background"
    garbage = [
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),  # pure noise
        np.full((32, 32, 3), 245, np.uint8),  # blank
        np.zeros((1, 1, 3), np.uint8),
        rng.integers(0, 256, (17, 45, 3), dtype=np.uint8),
        np.zeros((300, 200), np.uint8),
        torch.rand(3, 20, 70) * 2 - 1,
    ]
    for image in garbage:
        scene = check(image)
        assert isinstance(scene, Scene)
        assert not matches(image, caption)
    assert check(garbage[1]).objects == ()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="names no shape"):
        parse_caption("something red")
    with pytest.raises(ValueError, match="image_size"):
        ShapesConfig(image_size=16)
    with pytest.raises(ValueError, match="1 or 2 objects"):
        ShapesConfig(max_objects=3)
    with pytest.raises(TypeError):
        check("not an image")


def test_small_shapes_span_more_than_one_code():
    config = ShapesConfig(image_size=32, min_objects=1, max_objects=1)
    smallest = 32
    for index in range(100):
        example = generate(config, "train", index)
        background = example.image[0, 0].astype(int)
        painted = np.abs(example.image.astype(int) - background).sum(axis=2) > 60  # (H, W)
        rows, cols = np.nonzero(painted)
        smallest = min(smallest, rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    assert smallest >= 32 / 5  # a fifth of the side: two codes at f4 on 32 px


@pytest.mark.parametrize("image_size", [32, 47])
def test_each_object_drawn_over_its_box_alone_is_drawn_as_over_the_whole_image(image_size):
    rng = np.random.default_rng(0)
    for _ in range(200):
        placements = [
            Placement(
                ShapeObject(shape, color, "large", "center"), *rng.uniform(-0.1, 1.1, 2), side
            )
            for shape, color, side in zip(
                rng.choice(SHAPES, 2),
                rng.choice(list(COLORS), 2),
                rng.uniform(0.02, 0.6, 2),
                strict=True,
            )
        ]
        whole = np.full((image_size, image_size, 3), BACKGROUNDS["white"], np.float64)
        for obj, cx, cy, side in placements:
            alpha = coverage(obj.shape, cx, cy, side, image_size)[..., None]
            whole = whole * (1 - alpha) + np.asarray(COLORS[obj.color], np.float32) * alpha
        drawn = render(placements, "white", image_size)
        assert np.array_equal(drawn, np.round(whole).astype(np.uint8))


def test_draw_shows_the_scene_it_is_given():
    for scene in attribute_combinations()[::5]:  # every attribute value, both backgrounds
        assert check(draw(scene, 32)) == scene


def _exchanged(query: Query, swap: str) -> Query:
    """What a caption's parse becomes after `swap`: that one field exchanged or turned round."""
    if swap == "relation":
        turned = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        return dataclasses.replace(query, relation=turned[query.relation])
    first, second = query.objects
    return dataclasses.replace(
        query,
        objects=(
            dataclasses.replace(first, **{swap: getattr(second, swap)}),
            dataclasses.replace(second, **{swap: getattr(first, swap)}),
        ),
    )


def test_each_swap_changes_exactly_one_thing_and_breaks_the_match():
    config = ShapesConfig(image_size=32, min_objects=2, max_objects=2)
    made = dict.fromkeys(SWAPS, 0)
    for index in range(60):
        scene = generate(config, "train", index).scene
        captions = {canonical_caption(scene)}
        captions |= {sample_caption(scene, np.random.default_rng(seed)) for seed in range(4)}
        for caption in captions:
            query = parse_caption(caption)
            for swap, twin in swapped_twins(caption).items():
                assert parse_caption(twin) == _exchanged(query, swap), (caption, twin)
                assert not scene_matches(scene, twin), (caption, twin)
                made[swap] += 1
    assert all(count > 20 for count in made.values()), made


def test_a_copy_gives_one_object_the_others_value_and_breaks_the_match():
    config = ShapesConfig(image_size=32, min_objects=2, max_objects=2)
    made = 0
    for index in range(40):
        scene = generate(config, "train", index).scene
        caption = sample_caption(scene, np.random.default_rng(index))
        first, second = parse_caption(caption).objects
        for swap in ("color", "shape", "size"):
            copies = copied_captions(caption, swap)
            assert len(copies) == (2 if swapped_caption(caption, swap) else 0), (caption, swap)
            for copy, (changed, source) in zip(copies, ((0, second), (1, first)), strict=False):
                objects = list(parse_caption(caption).objects)
                objects[changed] = dataclasses.replace(
                    objects[changed], **{swap: getattr(source, swap)}
                )
                assert parse_caption(copy).objects == tuple(objects), (caption, copy)
                assert not scene_matches(scene, copy), (caption, copy)
                made += 1
    assert made > 60
    assert copied_captions("a large red circle in the center", "color") == []
    with pytest.raises(ValueError, match="use one of"):
        copied_captions("a red circle above a blue square", "relation")


def test_swaps_that_would_change_nothing_give_none():
    caption = "a small red circle to the left of a large red square on a white background"
    assert swapped_caption(caption, "color") is None  # both red
    assert swapped_caption(caption, "shape") == (
        "a small red square to the left of a large red circle on a white background"
    )
    assert swapped_caption(caption, "relation") == (
        "a small red circle to the right of a large red square on a white background"
    )
    assert swapped_caption("a red circle above a large blue square", "size") is None
    assert swapped_caption("a small cyan square below a small cyan square", "relation") is None
    assert (
        swapped_caption("a red circle on the left and a blue square on the right", "relation")
        is None
    )
    assert swapped_twins("a large red circle in the center on a white background") == {}
    assert swapped_caption("A big violet circle below a tiny red square", "color") == (
        "a big red circle below a tiny purple square"
    )
    with pytest.raises(ValueError, match="use one of"):
        swapped_caption(caption, "background")
