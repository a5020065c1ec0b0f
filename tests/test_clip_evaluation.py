"""CLIP evaluation: zero-shot retrieval on shapes, in-batch retrieval, and the swap probe."""

import dataclasses

import torch
import torch.nn.functional as F

from generator.clip.evaluation import in_batch_retrieval, shapes_retrieval, swap_probe
from tokenizer.data import DataConfig, Sample, build_dataset
from tokenizer.shapes import (
    SHAPES,
    Query,
    attribute_combinations,
    canonical_caption,
    check,
    is_held_out,
    parse_caption,
)
from tokenizer.shapes.swaps import SWAPS


class CheckerCLIP:
    """An oracle with the encoder's interface: one-hot embeddings of the attribute combination,
    read from pixels by the shapes checker, so its retrieval must be (almost) perfect."""

    def __init__(self) -> None:
        self.captions = [canonical_caption(scene) for scene in attribute_combinations()]
        self.index = {scene: k for k, scene in enumerate(attribute_combinations())}
        self.embed_dim = len(self.captions)

    def one_hot(self, indices: list[int]) -> torch.Tensor:
        return F.one_hot(torch.tensor(indices), self.embed_dim).float()

    def encode_text(self, captions, batch_size: int = 256) -> torch.Tensor:
        return self.one_hot([self.captions.index(caption) for caption in captions])

    def encode_image(self, images, batch_size: int = 256) -> torch.Tensor:
        return self.one_hot([self.index.get(check(image), 0) for image in images])


def test_shapes_retrieval_counts_one_object_test_images():
    dataset = build_dataset(DataConfig(num_test=400, image_size=32), "test")
    scores = shapes_retrieval(CheckerCLIP(), dataset, max_images=300)
    one_object = sum(len(dataset.example(i).scene.objects) == 1 for i in range(300))
    assert scores.seen.num_images + scores.held_out.num_images == one_object
    assert scores.held_out.num_images > 0
    assert scores.held_out_among_held_out >= scores.held_out.image_to_text_top1 >= 0.97
    for group in (scores.seen, scores.held_out):
        assert group.image_to_text_top1 >= 0.97 and group.text_to_image_top1 >= 0.97
        assert group.image_to_text_top5 >= group.image_to_text_top1
        assert 0 < group.num_texts <= group.num_images


def test_conventional_zero_shot_ranks_only_the_held_out_captions():
    class PrefersSeenPairs(CheckerCLIP):
        """Reads a held-out pair as the seen pair of its colour with the next shape."""

        def encode_image(self, images, batch_size: int = 256) -> torch.Tensor:
            right = super().encode_image(images)
            scenes = [check(image) for image in images]
            for row, scene in enumerate(scenes):
                if is_held_out(scene):
                    obj = scene.objects[0]
                    shape = SHAPES[(SHAPES.index(obj.shape) + 1) % len(SHAPES)]
                    seen = dataclasses.replace(
                        scene, objects=(dataclasses.replace(obj, shape=shape),)
                    )
                    right[row] = right[row] * 0.9 + self.one_hot([self.index[seen]])[0]
            return right

    dataset = build_dataset(DataConfig(num_test=400, image_size=32), "test")
    scores = shapes_retrieval(PrefersSeenPairs(), dataset, max_images=300)
    assert scores.held_out.image_to_text_top1 == 0.0
    assert scores.held_out_among_held_out == 1.0
    assert scores.seen.image_to_text_top1 == 1.0


def test_in_batch_retrieval_counts_repeated_captions_as_hits():
    class Lookup:  # embeds an image by its first pixel, a caption by its text
        def encode_image(self, images):
            return F.one_hot(images[:, 0, 0, 0].long(), 3).float()

        def encode_text(self, captions):
            return F.one_hot(torch.tensor([["a", "b", "c"].index(c) for c in captions]), 3).float()

    image = torch.tensor([0.0, 1.0, 0.0, 2.0]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    batch = Sample(image, ["a", "b", "a", "c"])
    scores = in_batch_retrieval(Lookup(), [batch])
    assert scores.image_to_text_top1 == scores.text_to_image_top1 == 1.0
    assert scores.num_images == 4
    wrong = Sample(image, ["b", "a", "b", "c"])
    assert in_batch_retrieval(Lookup(), [wrong]).image_to_text_top1 == 0.25


# ---------------------------------------------------------------------------------------------
# The swap probe


def as_tensor(image) -> torch.Tensor:
    """A shapes example's pixels as the probe hands them to the encoder."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1


class SceneCLIP:
    """Perfect by construction: an image embeds the parsed canonical caption of the scene it
    was drawn from, a caption embeds its own parse, each as a one-hot of that parse; with
    `blind_to_relations`, parses lose their relation first."""

    embed_dim = 4096

    def __init__(self, dataset, count: int, blind_to_relations: bool = False) -> None:
        self.blind = blind_to_relations
        self.index: dict[Query, int] = {}
        self.scenes = {}
        for index in range(count):
            example = dataset.example(index)
            self.scenes[as_tensor(example.image).numpy().tobytes()] = example.scene

    def one_hot(self, query: Query) -> torch.Tensor:
        if self.blind:
            query = dataclasses.replace(query, relation=None)
        position = self.index.setdefault(query, len(self.index))
        return F.one_hot(torch.tensor(position), self.embed_dim).float()

    def encode_text(self, captions, batch_size: int = 256) -> torch.Tensor:
        rows = [self.one_hot(parse_caption(caption)) for caption in captions]
        return torch.stack(rows) if rows else torch.empty(0, self.embed_dim)

    def encode_image(self, images, batch_size: int = 256) -> torch.Tensor:
        scenes = [self.scenes[image.numpy().tobytes()] for image in images]
        return torch.stack([self.one_hot(parse_caption(canonical_caption(s))) for s in scenes])


class ConstantCLIP:
    def encode_text(self, captions, batch_size: int = 256) -> torch.Tensor:
        return F.normalize(torch.ones(len(captions), 8), dim=-1)

    def encode_image(self, images, batch_size: int = 256) -> torch.Tensor:
        return F.normalize(torch.ones(len(images), 8), dim=-1)


def test_swap_probe_scores_a_perfect_clip_100_and_a_constant_one_0():
    dataset = build_dataset(DataConfig(num_test=200, image_size=32), "test")
    two_objects = sum(len(dataset.example(i).scene.objects) == 2 for i in range(120))
    perfect = swap_probe(SceneCLIP(dataset, 120), dataset, max_images=120)
    constant = swap_probe(ConstantCLIP(), dataset, max_images=120)
    assert perfect._fields == SWAPS
    for swap in SWAPS:
        score = getattr(perfect, swap)
        assert score.percent_right == 100.0
        assert 10 < score.num_images <= two_objects
        assert getattr(constant, swap) == (0.0, score.num_images)  # a tie is a miss
    assert perfect.relation.num_images >= perfect.color.num_images - 5  # most pairs differ
    assert perfect.as_dict()["size"] == {
        "percent_right": 100.0,
        "num_images": perfect.size.num_images,
    }


def test_swap_probe_finds_a_clip_blind_to_relations():
    dataset = build_dataset(DataConfig(num_test=100, image_size=32), "test")
    blind = swap_probe(SceneCLIP(dataset, 100, blind_to_relations=True), dataset, max_images=100)
    assert blind.relation.percent_right == 0.0
    assert blind.color.percent_right == blind.shape.percent_right == blind.size.percent_right == 100
    one_object = build_dataset(DataConfig(num_test=20, image_size=32, max_objects=1), "test")
    empty = swap_probe(ConstantCLIP(), one_object)
    assert empty.color.num_images == 0 and empty.color.percent_right != empty.color.percent_right
