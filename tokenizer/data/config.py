"""What every dataset is configured by and what it yields: `DataConfig`, filled by Hydra from
conf/data/*.yaml, and `Sample(image, caption)` with the image as (3, H, W) float32 in [-1, 1].
"""

import os
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tokenizer.base.configs import checked_config
from tokenizer.shapes import ShapesConfig

SOURCES = ("shapes", "folder", "webdataset")


class Sample(NamedTuple):
    """One image and its caption, as every dataset yields it."""

    image: torch.Tensor  # (3, H, W) float32 in [-1, 1]
    caption: str  # "" where there is none


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def fitting_workers(requested: int | None) -> int:
    """Loader processes for this machine: None gives one fewer than the cores (the training
    process needs one), at most 4; more than the cores are cut to the cores, saying so."""
    cores = usable_cores()
    if requested is None:
        return min(4, cores - 1)
    if requested > cores:
        warnings.warn(
            f"data.num_workers={requested} is more than the {cores} CPU cores this process may "
            f"use, where loaders only slow training down: using {cores}. Leave "
            "data.num_workers unset (null) to fit it to the machine.",
            stacklevel=3,
        )
        return cores
    return requested


@checked_config("data")
@dataclass
class DataConfig:
    """Where images come from and how they are batched. Plain types, so Hydra can fill it."""

    source: str = "shapes"  # one of SOURCES
    path: str = ""  # folder: its root; webdataset: a .tar, a folder of .tar, or "a-{000..009}.tar"
    image_size: int = 32
    batch_size: int = 64
    num_workers: int | None = None  # loader processes; None: fit them to the CPU cores
    random_flip: bool = False  # mirror train images left-right (this swaps "left" and "right")
    random_crop: bool = False  # crop train images at random along the longer side, not centred
    # shapes
    min_objects: int = 1
    max_objects: int = 2
    num_train: int = 50_000
    num_val: int = 1_000
    num_test: int = 1_000
    seed: int = 0
    # folder and webdataset
    captions_file: str = ""  # path -> caption, .jsonl or .csv; default: captions.* in path
    val_path: str = ""  # a separate validation set; without one, val_fraction of path is held out
    test_path: str = ""  # likewise for test
    val_fraction: float = 0.01  # chosen by a stable hash of each file's key
    test_fraction: float = 0.0
    shuffle_buffer: int = 1_000  # webdataset samples shuffled in memory, train only
    alpha_background: int = 255  # grey level that transparent pixels are composited over
    max_image_pixels: int = 1 << 27  # larger images are skipped (Pillow's decompression-bomb limit)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source is {self.source!r}: use one of {SOURCES}.")
        if self.source == "shapes":
            self.shapes_config()  # checks image_size and the object counts
            if self.random_flip:
                raise ValueError(
                    "data.random_flip would mirror shapes images and make their 'left'/'right' "
                    "captions wrong: set random_flip=false for source=shapes."
                )
        elif not self.path:
            raise ValueError(f"data.path is empty: set it to the {self.source} data to read.")
        if self.image_size < 8:
            raise ValueError(f"data.image_size is {self.image_size}: use at least 8 px.")
        if self.batch_size < 1 or (self.num_workers is not None and self.num_workers < 0):
            raise ValueError("data.batch_size must be at least 1 and data.num_workers at least 0.")
        self.num_workers = fitting_workers(self.num_workers)
        fractions = (self.val_fraction, self.test_fraction)
        if min(fractions) < 0 or sum(fractions) >= 1:
            raise ValueError(
                f"data.val_fraction={self.val_fraction} and data.test_fraction={self.test_fraction}"
                " must be non-negative and sum to less than 1."
            )
        if not 0 <= self.alpha_background <= 255 or self.max_image_pixels < 1:
            raise ValueError("data.alpha_background must be in 0..255 and max_image_pixels >= 1.")

    def shapes_config(self) -> ShapesConfig:
        return ShapesConfig(self.image_size, self.min_objects, self.max_objects, self.seed)
