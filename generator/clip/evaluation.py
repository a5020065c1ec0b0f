"""CLIP retrieval: zero-shot over the shapes attribute combinations, and in-batch for any data.

Zero-shot on shapes counts like this. The candidates are the canonical captions of every
one-object attribute combination (`shapes.attribute_combinations()`: shape x colour x size x
position x background, 648 captions). The queries are the test images that show one object,
so that exactly one candidate is right; two-object images have no candidate and are left out.
- image -> caption: each image ranks all 648 captions; top-k is a hit when its own scene's
  canonical caption is among the k best.
- caption -> image: each combination that some test image shows ranks all those one-object
  test images; top-k is a hit when one of the k best images shows that combination.
Scores are reported separately for seen combinations and for held-out ones (a colour-shape
pair the training split never shows, `shapes.is_held_out`). Ranking all 648 captions is the
generalised zero-shot count, where a held-out image competes with the seen captions its model
was trained on; `held_out_among_held_out` is the conventional zero-shot count: image -> caption
top-1 of held-out images among the held-out combinations' captions only.

The swap probe asks whether CLIP binds attributes to objects and reads their relation. Each
two-object test image's canonical caption competes with its swapped twins, one at a time: the
colours, the shapes or the sizes of its two objects exchanged, or its relation turned round
("left of" <-> "right of", "above" <-> "below"). A swap scores the percentage of images whose
true caption CLIP scores strictly higher than the twin (a tie is a miss: a CLIP that cannot
tell them apart scores 0%); images whose objects share the swapped attribute have no twin for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from generator.clip.encoder import CLIPEncoder
from tokenizer.data import Sample, ShapesDataset
from tokenizer.shapes import attribute_combinations, canonical_caption, is_held_out
from tokenizer.shapes.swaps import SWAPS, swapped_caption

TOP_K = (1, 5)


@dataclass
class RetrievalScores:
    """Top-1 and top-5 accuracy in [0, 1], both directions, and how many queries each used."""

    image_to_text_top1: float
    image_to_text_top5: float
    text_to_image_top1: float
    text_to_image_top5: float
    num_images: int  # image -> text queries
    num_texts: int  # text -> image queries


@dataclass
class ShapesRetrieval:
    seen: RetrievalScores  # test images of combinations the training split shows
    held_out: RetrievalScores  # test images of held-out colour-shape pairs
    held_out_among_held_out: float  # their top-1 among held-out combinations' captions only


class SwapScore(NamedTuple):
    percent_right: float  # % of probed images whose true caption beats the twin; nan if none
    num_images: int  # two-object images whose caption has this twin


class SwapProbe(NamedTuple):
    """One SwapScore per swap of tokenizer.shapes.swaps.SWAPS."""

    color: SwapScore
    shape: SwapScore
    size: SwapScore
    relation: SwapScore

    def as_dict(self) -> dict[str, dict[str, float | int]]:
        """{"color": {"percent_right": ..., "num_images": ...}, ...}, for JSON."""
        return {swap: score._asdict() for swap, score in self._asdict().items()}


class InBatchAccuracy(NamedTuple):
    image_to_text: torch.Tensor  # scalar, fraction of images whose best caption is their own
    text_to_image: torch.Tensor  # scalar, fraction of captions whose best image is their own


def in_batch_accuracy(image: torch.Tensor, text: torch.Tensor) -> InBatchAccuracy:
    """Top-1 retrieval among a batch of paired embeddings (B, E), item i matching item i."""
    similarity = image @ text.T  # (B, B)
    target = torch.arange(image.shape[0], device=image.device)
    return InBatchAccuracy(
        (similarity.argmax(dim=1) == target).float().mean(),
        (similarity.argmax(dim=0) == target).float().mean(),
    )


def top_k_hits(similarity: torch.Tensor, relevant: torch.Tensor, k: int) -> torch.Tensor:
    """(Q,) bool: whether any of a query's k most similar candidates is relevant.

    similarity (Q, N) scores queries against candidates; relevant (Q, N) bool marks the right ones.
    """
    best = similarity.topk(min(k, similarity.shape[1]), dim=1).indices  # (Q, k)
    return relevant.gather(1, best).any(dim=1)


def _mean(hits: torch.Tensor) -> float:
    return hits.float().mean().item() if hits.numel() else float("nan")


def _scores(
    image_hits: dict[int, torch.Tensor], text_hits: dict[int, torch.Tensor]
) -> RetrievalScores:
    return RetrievalScores(
        image_to_text_top1=_mean(image_hits[1]),
        image_to_text_top5=_mean(image_hits[5]),
        text_to_image_top1=_mean(text_hits[1]),
        text_to_image_top5=_mean(text_hits[5]),
        num_images=image_hits[1].numel(),
        num_texts=text_hits[1].numel(),
    )


class _OneObjectImages(NamedTuple):
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    labels: torch.Tensor  # (N,) index of each image's combination
    held_out: torch.Tensor  # (N,) bool


def _one_object_images(dataset: ShapesDataset, max_images: int | None) -> _OneObjectImages:
    index_of = {scene: k for k, scene in enumerate(attribute_combinations())}
    images, labels, held_out = [], [], []
    for index in range(min(len(dataset), max_images or len(dataset))):
        example = dataset.example(index)
        if len(example.scene.objects) != 1:
            continue
        images.append(torch.from_numpy(example.image).permute(2, 0, 1).float() / 127.5 - 1)
        labels.append(index_of[example.scene])
        held_out.append(is_held_out(example.scene))
    if not images:
        raise ValueError(
            "the shapes split holds no one-object image to evaluate: raise data.num_test or "
            "max_images, and keep data.min_objects=1."
        )
    return _OneObjectImages(torch.stack(images), torch.tensor(labels), torch.tensor(held_out))


@torch.no_grad()
def shapes_retrieval(
    encoder: CLIPEncoder,
    dataset: ShapesDataset,
    max_images: int | None = None,
    batch_size: int = 256,
) -> ShapesRetrieval:
    """Zero-shot retrieval on a shapes split (see the module docstring for how it counts)."""
    combinations = attribute_combinations()
    captions = [canonical_caption(scene) for scene in combinations]
    combination_held_out = torch.tensor([is_held_out(scene) for scene in combinations])
    test = _one_object_images(dataset, max_images)
    text = encoder.encode_text(captions, batch_size).cpu()  # (K, E)
    image = encoder.encode_image(test.images, batch_size).cpu()  # (N, E)
    similarity = image @ text.T  # (N, K)

    relevant = test.labels[:, None] == torch.arange(len(combinations))  # (N, K)
    shown = torch.unique(test.labels)  # combinations some test image shows, (Q,)
    image_hits = {k: top_k_hits(similarity, relevant, k) for k in TOP_K}  # (N,) each
    text_hits = {k: top_k_hits(similarity.T[shown], relevant.T[shown], k) for k in TOP_K}

    def group(held_out: bool) -> RetrievalScores:
        images = test.held_out == held_out
        texts = combination_held_out[shown] == held_out
        return _scores(
            {k: hits[images] for k, hits in image_hits.items()},
            {k: hits[texts] for k, hits in text_hits.items()},
        )

    held_out_images = similarity[test.held_out][:, combination_held_out]  # (H, K_held_out)
    held_out_relevant = relevant[test.held_out][:, combination_held_out]
    return ShapesRetrieval(
        seen=group(False),
        held_out=group(True),
        held_out_among_held_out=_mean(top_k_hits(held_out_images, held_out_relevant, 1)),
    )


@torch.no_grad()
def in_batch_retrieval(
    encoder: CLIPEncoder, batches: Iterable[Sample], max_images: int | None = None
) -> RetrievalScores:
    """Retrieval within each batch of a captioned loader (e.g. a test split's own captions).

    Every image ranks the batch's captions and every caption the batch's images; a hit is a
    caption (or an image) whose caption text equals the query's, so repeated captions are not
    counted as misses. Top-k depends on the batch size: report it with the figures. Images
    without a caption are skipped.
    """
    image_hits: dict[int, list[torch.Tensor]] = {k: [] for k in TOP_K}
    text_hits: dict[int, list[torch.Tensor]] = {k: [] for k in TOP_K}
    seen = 0
    for batch in batches:
        keep = [i for i, caption in enumerate(batch.caption) if caption.strip()]
        if max_images is not None:
            keep = keep[: max_images - seen]
        if len(keep) < 2:
            continue
        captions = [batch.caption[i].strip() for i in keep]
        image = encoder.encode_image(batch.image[keep]).cpu()  # (B, E)
        text = encoder.encode_text(captions).cpu()  # (B, E)
        ids = torch.tensor([captions.index(caption) for caption in captions])
        relevant = ids[:, None] == ids[None, :]  # (B, B) same caption text
        similarity = image @ text.T  # (B, B)
        for k in TOP_K:
            image_hits[k].append(top_k_hits(similarity, relevant, k))
            text_hits[k].append(top_k_hits(similarity.T, relevant, k))
        seen += len(keep)
        if max_images is not None and seen >= max_images:
            break
    if not seen:
        raise ValueError("no captioned images to evaluate: the data has no captions.")
    return _scores(
        {k: torch.cat(hits) for k, hits in image_hits.items()},
        {k: torch.cat(hits) for k, hits in text_hits.items()},
    )


class _TwoObjectImages(NamedTuple):
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    captions: list[str]  # N canonical captions


def _two_object_images(dataset: ShapesDataset, max_images: int | None) -> _TwoObjectImages:
    images, captions = [], []
    for index in range(min(len(dataset), max_images or len(dataset))):
        example = dataset.example(index)
        if len(example.scene.objects) == 2:
            images.append(torch.from_numpy(example.image).permute(2, 0, 1).float() / 127.5 - 1)
            captions.append(canonical_caption(example.scene))
    size = dataset.config.image_size
    return _TwoObjectImages(
        torch.stack(images) if images else torch.empty(0, 3, size, size), captions
    )


@torch.no_grad()
def swap_probe(
    encoder: CLIPEncoder,
    dataset: ShapesDataset,
    max_images: int | None = None,
    batch_size: int = 256,
) -> SwapProbe:
    """The swap probe on the two-object images among a shapes split's first `max_images`
    (see the module docstring)."""
    images, captions = _two_object_images(dataset, max_images)
    image = encoder.encode_image(images, batch_size).cpu()  # (N, E)
    true = (image * encoder.encode_text(captions, batch_size).cpu()).sum(dim=1)  # (N,)
    scores = {}
    for swap in SWAPS:
        twins = {row: swapped_caption(caption, swap) for row, caption in enumerate(captions)}
        rows = [row for row, twin in twins.items() if twin is not None]
        twin = encoder.encode_text([twins[row] for row in rows], batch_size).cpu()  # (n, E)
        right = true[rows] > (image[rows] * twin).sum(dim=1)
        percent = 100 * int(right.sum()) / len(rows) if rows else float("nan")
        scores[swap] = SwapScore(percent, len(rows))
    return SwapProbe(**scores)
