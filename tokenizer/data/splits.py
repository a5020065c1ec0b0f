"""Which data belongs to which split: shapes splits by count, folders and shards either by a
path of their own or by a stable hash of each file's key that carves fractions out of `path`.
"""

import hashlib
from typing import NamedTuple

from tokenizer.data.config import DataConfig


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """The split a file belongs to, by a stable hash of its key: adding files moves no others."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < val_fraction:
        return "val"
    return "test" if u < val_fraction + test_fraction else "train"


class SplitSource(NamedTuple):
    """Where one split's files come from, and which of them it keeps."""

    path: str
    val_fraction: float  # fractions carved out of `path`; 0 where the split has its own path
    test_fraction: float
    split: str | None  # the split to keep from `path`; None keeps everything


def split_source(config: DataConfig, split: str) -> SplitSource:
    """The path a folder or shard split reads, and the fractions that carve it out of data.path."""
    own_path = {"val": config.val_path, "test": config.test_path}.get(split, "")
    if own_path:
        return SplitSource(own_path, 0.0, 0.0, None)
    val = 0.0 if config.val_path else config.val_fraction
    test = 0.0 if config.test_path else config.test_fraction
    return SplitSource(config.path, val, test, split)


def shapes_length(config: DataConfig, split: str) -> int:
    """How many shapes examples the config gives the split."""
    return {"train": config.num_train, "val": config.num_val, "test": config.num_test}[split]


def has_split(config: DataConfig, split: str) -> bool:
    """Whether the config gives this split any data at all."""
    if config.source == "shapes":
        return shapes_length(config, split) > 0
    if split == "train":
        return True
    own_path, fraction = {
        "val": (config.val_path, config.val_fraction),
        "test": (config.test_path, config.test_fraction),
    }[split]
    return bool(own_path) or fraction > 0
