"""Captioned images for training CLIP, in batches without false negatives.

The contrastive loss treats every other caption in a batch as a wrong match for an image. When
two items of a batch could both be described by one caption, that is a false negative: the
loss pushes apart an image and a caption that do belong together. On shapes this is frequent
(several phrasings describe one scene, and a phrasing that leaves out an attribute describes
several scenes), so each batch keeps an item only if no kept caption describes its scene and
its caption describes no kept scene (checked with the shapes caption parser). Elsewhere, items
with the same caption text are the duplicates. Dropped items make the batch a little smaller.

Shapes images can also be captioned by their canonical caption (`canonical_fraction` of the
time): one fully specified phrasing per scene is a cleaner target than the sampled phrasings,
some of which leave attributes out, and it is the phrasing zero-shot retrieval ranks. A CLIP
trained on canonical captions alone would read other phrasings ("a red circle") poorly, so
the rest keep the sampled caption.

With `hard_negatives`, each training batch also carries its two-object captions' swapped twins
(the same caption with the colours, shapes or sizes of its two objects exchanged, or its
relation turned round; tokenizer/shapes/swaps.py): captions no image of the batch shows, which
CLIPModule adds to the text side as extra negatives (NegCLIP's recipe). A twin that describes
any image of the batch is left out, as are twins of captions that cannot be parsed. A twin that
names a held-out colour-shape pair gives way to its copies (one object taking the other's colour
or shape) that name none: no training image shows a held-out pair, so such a twin could only
ever be a wrong answer.

Under DDP each rank batches its own share of the data (Lightning's distributed sampler, or
ShardDataset's split of the shards); the ranks' batches then differ in size, and CLIPModule
trims them to the smallest before gathering features across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from tokenizer.data import DataConfig, ShapesDataset, build_dataset, has_split, make_loader
from tokenizer.shapes import (
    HELD_OUT,
    Query,
    Scene,
    ShapesExample,
    canonical_caption,
    parse_caption,
    scene_matches,
)
from tokenizer.shapes.swaps import copied_captions, swapped_twins

CACHE_BYTES = 1 << 30  # shapes splits whose uint8 pixels fit are drawn once, then kept


class CaptionedImage(NamedTuple):
    image: torch.Tensor  # (3, H, W) float32 in [-1, 1]
    caption: str
    scene: Scene | None  # what a shapes image shows; None for other sources


class CaptionBatch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W)
    captions: list[str]  # B captions, none of which describes another item's image
    negatives: tuple[str, ...] = ()  # captions none of the B images shows (hard negatives)


class CaptionedDataset(Dataset):
    """A map-style dataset's samples with their scene where the dataset knows it (shapes).

    Shapes examples are drawn once and then kept in memory (by each loader worker) when the
    split's pixels fit in CACHE_BYTES: drawing costs as much CPU as a small CLIP's training
    step, and a run sees every example many times.
    """

    def __init__(self, dataset: Dataset, canonical_fraction: float = 0.0) -> None:
        self.dataset = dataset
        self.canonical_fraction = canonical_fraction
        self.skip_log = getattr(dataset, "skip_log", None)
        self.cache: dict[int, ShapesExample] | None = None
        if isinstance(dataset, ShapesDataset):
            size = dataset.config.image_size
            if len(dataset) * size * size * 3 <= CACHE_BYTES:
                self.cache = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def _example(self, index: int) -> ShapesExample:
        if self.cache is None:
            return self.dataset.example(index)
        if index not in self.cache:
            self.cache[index] = self.dataset.example(index)
        return self.cache[index]

    def __getitem__(self, index: int) -> CaptionedImage:
        if isinstance(self.dataset, ShapesDataset):
            example = self._example(index)
            image = torch.from_numpy(example.image).permute(2, 0, 1).float() / 127.5 - 1
            caption = example.caption
            if torch.rand(()).item() < self.canonical_fraction:
                caption = canonical_caption(example.scene)
            return CaptionedImage(image, caption, example.scene)
        sample = self.dataset[index]
        return CaptionedImage(sample.image, sample.caption, None)


class CaptionedStream(IterableDataset):
    """A streaming dataset's samples (WebDataset shards); their scenes are unknown."""

    def __init__(self, dataset: IterableDataset) -> None:
        self.dataset = dataset
        self.skip_log = getattr(dataset, "skip_log", None)

    def __iter__(self) -> Iterator[CaptionedImage]:
        for sample in self.dataset:
            yield CaptionedImage(sample.image, sample.caption, None)


class _Kept(NamedTuple):
    scene: Scene
    query: Query


def _objects_key(scene: Scene) -> tuple:
    """Every caption names each object's colour and shape, so only scenes with the same
    colour-shape pairs can share a caption."""
    return tuple(sorted((obj.color, obj.shape) for obj in scene.objects))


def _pairs(query: Query | None) -> list[tuple]:
    """The colour-shape pair of each object a caption names; (None,) for one it cannot parse."""
    return [(obj.color, obj.shape) for obj in query.objects] if query else [(None,)]


def _twins(caption: str) -> list[tuple[str, Query | None]]:
    """The caption's swapped twins with their parses, each that names a held-out pair replaced
    by its copies."""
    twins = []
    for swap, twin in swapped_twins(caption).items():
        query = _parse(twin)
        if any(pair in HELD_OUT for pair in _pairs(query)):
            twins += [(copy, _parse(copy)) for copy in copied_captions(caption, swap)]
        else:
            twins.append((twin, query))
    return twins


def _parse(caption: str) -> Query | None:
    try:
        return parse_caption(caption)
    except ValueError:
        return None


class DistinctCaptions:
    """Collate that keeps, in order, each item whose caption is not confusable with a kept one;
    with `hard_negatives`, also the kept captions' swapped twins that fit no kept image.

    A class, not a closure, so DataLoader workers started by spawn can unpickle it.
    """

    def __init__(self, hard_negatives: bool = False) -> None:
        self.hard_negatives = hard_negatives

    def __call__(self, items: Sequence[CaptionedImage]) -> CaptionBatch:
        kept: list[CaptionedImage] = []
        scenes: dict[tuple, list[_Kept]] = {}
        captions: set[str] = set()
        for item in items:
            caption = item.caption.strip()
            if not caption or caption.lower() in captions:
                continue
            if item.scene is not None:
                query = _parse(caption)
                group = scenes.setdefault(_objects_key(item.scene), [])
                if query is None or any(self._confusable(item.scene, query, k) for k in group):
                    continue
                group.append(_Kept(item.scene, query))
            captions.add(caption.lower())
            kept.append(item)
        images = torch.stack([item.image for item in kept]) if kept else torch.empty(0, 3, 0, 0)
        negatives = self._negatives(kept, scenes) if self.hard_negatives else ()
        return CaptionBatch(images, [item.caption.strip() for item in kept], negatives)

    @staticmethod
    def _confusable(scene: Scene, query: Query, other: _Kept) -> bool:
        return scene_matches(other.scene, query) or scene_matches(scene, other.query)

    @staticmethod
    def _negatives(
        kept: Sequence[CaptionedImage], scenes: dict[tuple, list[_Kept]]
    ) -> tuple[str, ...]:
        """The swapped twins of the kept shapes captions that no kept scene satisfies, once each.

        Only scenes with the twin's colour-shape pairs can satisfy it (see `_objects_key`); a
        twin that leaves a colour or a shape unnamed could fit too many scenes, and is left out.
        A colour or shape twin that names a pair no training image shows (HELD_OUT) gives way
        to its copies that name none (`copied_captions`), so a batch keeps about as many
        negatives: a caption that is only ever a wrong answer is pushed from every image, and
        CLIP learns to rank prompts of held-out pairs below any other caption. On the quickstart
        that held the shape swap of images with a held-out pair at 66% right (96% elsewhere)
        and their own captions' top-1 at 49%; with the copies, 88% and 79%.
        """
        negatives: dict[str, None] = {}
        for item in kept:
            if item.scene is None:
                continue
            for twin, query in _twins(item.caption.strip()):
                pairs = _pairs(query)
                if twin in negatives or any(None in pair or pair in HELD_OUT for pair in pairs):
                    continue
                fitting = scenes.get(tuple(sorted(pairs)), [])
                if not any(scene_matches(other.scene, query) for other in fitting):
                    negatives[twin] = None
        return tuple(negatives)


class CaptionDataModule(L.LightningDataModule):
    """Train/val loaders of distinct-caption batches from any data source; on shapes,
    `canonical_fraction` of the training captions are canonical and, with `hard_negatives`,
    training batches carry their captions' swapped twins (validation keeps the sampled captions
    and no twins, so its loss stays CLIP's own)."""

    def __init__(
        self, config: DataConfig, canonical_fraction: float = 0.0, hard_negatives: bool = False
    ) -> None:
        super().__init__()
        if not 0 <= canonical_fraction <= 1:
            raise ValueError(
                f"canonical_captions must be in [0, 1], got {canonical_fraction}: it is the "
                "fraction of shapes training captions replaced by the canonical one."
            )
        self.config = config
        self.canonical_fraction = canonical_fraction
        self.hard_negatives = hard_negatives

    def _dataset(self, split: str) -> Dataset:
        dataset = build_dataset(self.config, split)
        if isinstance(dataset, IterableDataset):
            return CaptionedStream(dataset)
        fraction = self.canonical_fraction if split == "train" else 0.0
        return CaptionedDataset(dataset, fraction)

    def _loader(self, split: str) -> DataLoader | list:
        if not has_split(self.config, split):
            return []  # Lightning runs no loop for an empty list
        train = split == "train"
        collate = DistinctCaptions(hard_negatives=self.hard_negatives and train)
        return make_loader(self._dataset(split), self.config, train=train, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val")
