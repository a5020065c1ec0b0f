"""CLIP with hard negatives (NegCLIP's recipe): the swapped twins a training batch carries, and
the loss that adds them to the text side."""

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_SMALL, random_images

from generator.clip import CLIPConfig
from generator.clip.data import CaptionBatch, CaptionDataModule, CaptionedImage, DistinctCaptions
from generator.clip.loss import HardNegativeLoss
from generator.clip.module import CLIPModule
from tokenizer.base.optim import OptimConfig
from tokenizer.data import DataConfig
from tokenizer.shapes import (
    HELD_OUT,
    Scene,
    ShapeObject,
    canonical_caption,
    parse_caption,
    scene_matches,
)
from tokenizer.shapes.swaps import copied_captions, swapped_twins

RED_LEFT = Scene(
    (
        ShapeObject("circle", "red", "small", "left"),
        ShapeObject("square", "purple", "large", "right"),
    ),
    "white",
)
RED_RIGHT = Scene(  # the same two objects, places exchanged: RED_LEFT's relation twin shows this
    (
        ShapeObject("square", "purple", "large", "left"),
        ShapeObject("circle", "red", "small", "right"),
    ),
    "white",
)
ONE = Scene((ShapeObject("triangle", "green", "small", "center"),), "black")


def captioned(*scenes: Scene) -> list[CaptionedImage]:
    return [CaptionedImage(torch.zeros(3, 32, 32), canonical_caption(s), s) for s in scenes]


def test_a_batch_carries_the_twins_that_no_image_of_it_shows():
    batch = DistinctCaptions(hard_negatives=True)(captioned(RED_LEFT, ONE))
    assert batch.captions == [canonical_caption(RED_LEFT), canonical_caption(ONE)]
    assert set(batch.negatives) == set(swapped_twins(canonical_caption(RED_LEFT)).values())
    assert len(batch.negatives) == 4  # colour, shape, size and relation; one object has none

    both = DistinctCaptions(hard_negatives=True)(captioned(RED_LEFT, RED_RIGHT, ONE))
    assert len(both.captions) == 3 and len(both.negatives) == 6  # each one's relation twin
    for twin in both.negatives:  # is the other's scene, so it is no negative
        assert not any(scene_matches(scene, twin) for scene in (RED_LEFT, RED_RIGHT, ONE))
    assert DistinctCaptions()(captioned(RED_LEFT, ONE)).negatives == ()
    web = [CaptionedImage(torch.zeros(3, 32, 32), "a red circle left of a blue square", None)]
    assert DistinctCaptions(hard_negatives=True)(web).negatives == ()  # no scene, no twins


def test_twins_that_name_a_held_out_pair_give_way_to_copies_that_do_not():
    """Red circle and blue square: exchanging their colours or their shapes names a blue circle,
    a pair no training image shows, which CLIP must not learn as a wrong answer; one object
    taking the other's colour or shape (red circle and red square) is the negative instead."""
    scene = Scene(
        (
            ShapeObject("circle", "red", "small", "left"),
            ShapeObject("square", "blue", "large", "right"),
        ),
        "white",
    )
    twins = swapped_twins(canonical_caption(scene))
    assert ("blue", "circle") in HELD_OUT and len(twins) == 4
    batch = DistinctCaptions(hard_negatives=True)(captioned(scene))
    copies = {
        copy
        for swap in ("color", "shape")
        for copy in copied_captions(canonical_caption(scene), swap)
        if not any(pair in HELD_OUT for pair in _pairs(copy))
    }
    assert len(copies) == 2
    assert set(batch.negatives) == {twins["size"], twins["relation"], *copies}


def _pairs(caption: str) -> list[tuple]:
    return [(obj.color, obj.shape) for obj in parse_caption(caption).objects]


def test_training_batches_have_twins_and_validation_batches_none():
    config = DataConfig(num_train=64, num_val=64, batch_size=64, num_workers=0)
    data = CaptionDataModule(config, canonical_fraction=1.0, hard_negatives=True)
    train = next(iter(data.train_dataloader()))
    assert len(train.negatives) > len(train.captions) // 2
    assert not set(train.negatives) & set(train.captions)
    assert next(iter(data.val_dataloader())).negatives == ()
    plain = CaptionDataModule(config, canonical_fraction=1.0)
    assert next(iter(plain.train_dataloader())).negatives == ()


def unit(rows: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, 8, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_the_loss_without_negatives_is_clips_and_negatives_add_image_side_columns():
    image, text, negatives = unit(5, 0), unit(5, 1), unit(3, 2)
    scale = torch.tensor(10.0)
    none = torch.empty(0, 8)
    expected = open_clip.ClipLoss()(image, text, scale)
    assert torch.allclose(HardNegativeLoss()(image, text, none, scale), expected, atol=1e-6)
    labels = torch.arange(5)
    per_image = scale * image @ torch.cat([text, negatives]).T  # (5, 8)
    manual = F.cross_entropy(per_image, labels) + F.cross_entropy(scale * text @ image.T, labels)
    loss = HardNegativeLoss()(image, text, negatives, scale)
    assert torch.allclose(loss, manual / 2, atol=1e-6) and loss > expected
    negatives.requires_grad_(True)
    HardNegativeLoss()(image, text, negatives, scale).backward()
    assert negatives.grad.abs().sum() > 0


@pytest.mark.parametrize("hard_negatives", [True, False])
def test_the_module_adds_the_twins_in_training_only(hard_negatives):
    torch.manual_seed(0)
    config = CLIPConfig(source="trained", **TINY_SMALL)
    module = CLIPModule.from_configs(config, OptimConfig(), hard_negatives=hard_negatives)
    captions = [canonical_caption(RED_LEFT), canonical_caption(ONE)]
    twins = tuple(swapped_twins(captions[0]).values())
    batch = CaptionBatch(random_images(2), captions, twins)
    embeddings = module.embed(batch)
    scale = module.model.logit_scale.exp()
    clip = module.loss(embeddings.image, embeddings.text, scale)
    assert torch.equal(module._loss(batch, embeddings, with_negatives=False), clip)
    negatives = module.model.encode_text(module.tokenize(list(twins)), normalize=True)
    with_twins = module.negative_loss(embeddings.image, embeddings.text, negatives, scale)
    expected = with_twins if hard_negatives else clip
    assert torch.allclose(module._loss(batch, embeddings, with_negatives=True), expected)
    assert module.hparams.hard_negatives is hard_negatives
