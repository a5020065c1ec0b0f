"""Image datasets behind one interface: the built-in shapes, an image folder, WebDataset shards.

Every dataset yields `Sample(image, caption)` with the image as (3, H, W) float32 in [-1, 1].
`build_dataset` gives one split to scripts; `datamodule.ImageDataModule` wraps them for Lightning
(imported from there, so that sampling never loads Lightning).

- `config`: `DataConfig` and `Sample`
- `splits`: which files belong to which split
- `images`: decoding files to RGB and the transform to a tensor
- `skipping`: the log of unreadable files and the loader that reports it each epoch
- `shapes`, `folder`, `shards`: the three sources
- `loading`: `build_dataset` and `make_loader`
- `datamodule`: `ImageDataModule`
"""

from tokenizer.data.config import SOURCES, DataConfig, Sample
from tokenizer.data.folder import FolderDataset
from tokenizer.data.images import ImageTransform, load_rgb, to_rgb
from tokenizer.data.loading import build_dataset, make_loader
from tokenizer.data.shapes import ShapesDataset
from tokenizer.data.shards import (
    SHARD_IMAGE_KEYS,
    RankSplit,
    ShardDataset,
    current_rank_split,
    shard_urls,
)
from tokenizer.data.skipping import ReportingDataLoader, SkipLog, Skipped
from tokenizer.data.splits import has_split, split_of

__all__ = [
    "SHARD_IMAGE_KEYS",
    "SOURCES",
    "DataConfig",
    "FolderDataset",
    "ImageTransform",
    "RankSplit",
    "ReportingDataLoader",
    "Sample",
    "ShapesDataset",
    "ShardDataset",
    "SkipLog",
    "Skipped",
    "build_dataset",
    "current_rank_split",
    "has_split",
    "load_rgb",
    "make_loader",
    "shard_urls",
    "split_of",
    "to_rgb",
]
