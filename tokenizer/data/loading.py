"""One split of the configured source (`build_dataset`) and its batches (`make_loader`)."""

import torch
from torch.utils.data import Dataset, IterableDataset

from tokenizer.data.config import DataConfig
from tokenizer.data.folder import FolderDataset
from tokenizer.data.shapes import ShapesDataset
from tokenizer.data.shards import RankSplit, ShardDataset
from tokenizer.data.skipping import ReportingDataLoader
from tokenizer.data.splits import has_split, shapes_length
from tokenizer.shapes import SPLITS


def make_loader(
    dataset: Dataset, config: DataConfig, train: bool, collate_fn=None
) -> ReportingDataLoader:
    """Batches of `dataset` as the config says; shuffled and full batches only in training."""
    workers = config.num_workers
    return ReportingDataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=train and not isinstance(dataset, IterableDataset),
        drop_last=train,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_fn,
    )


def build_dataset(
    config: DataConfig, split: str, train: bool | None = None, ranks: RankSplit | None = None
) -> Dataset:
    """One split of the configured source. `train` (default: split == "train") turns on the
    random augmentations the config allows. `ranks` splits WebDataset shards (default: this
    process's rank); map-style sources are split between ranks by Lightning's sampler."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {SPLITS}.")
    if not has_split(config, split):
        raise ValueError(
            f"the data config has no {split} split: set data.num_{split}, data.{split}_path or "
            f"data.{split}_fraction."
        )
    if config.source == "shapes":
        return ShapesDataset(config.shapes_config(), split, shapes_length(config, split))
    if config.source == "folder":
        return FolderDataset(config, split, train)
    return ShardDataset(config, split, train, ranks)
