"""A run's own data for the scripts that show what the run does: captions of held-out images to
prompt with, held-out pictures to vary, originals to reconstruct, whole folders to score.

sample.py, variations.py, evaluate.py and report.py read the data config (`data=...`) through
here, at the run's tokenizer resolution, so that a user's folder gives prompts and sources from
that folder, never the shapes demo's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from generator.evaluation import caption_prompts, first_images
from tokenizer.base.run_dir import RunDir, config_file
from tokenizer.data import DataConfig, build_dataset, has_split, make_loader
from tokenizer.data.skipping import ReportingDataLoader
from tokenizer.vqgan import VQGANConfig

ALL = "all"  # the split name for every image of data.path, unshuffled and unaugmented


def tokenizer_image_size(run_dir: str | Path) -> int:
    """The resolution the run's tokenizer works at, from its config alone."""
    tokenizer = RunDir(run_dir).tokenizer
    path = config_file(tokenizer)
    if not path.is_file():
        raise FileNotFoundError(
            f"No tokenizer in {run_dir} (looked for {path}): train one with "
            "scripts/train_tokenizer.py, or point run_dir at a trained run."
        )
    return VQGANConfig.load(tokenizer).image_size


def run_data_config(settings: Any, run_dir: str | Path) -> DataConfig:
    """The data config (`data=...` of a script) at the run's tokenizer resolution."""
    if settings is None:
        raise ValueError(
            "this needs a dataset: pass data=folder data.path=/path/to/images (or data=shapes)."
        )
    config = instantiate(settings, _convert_="all")
    return replace(config, image_size=tokenizer_image_size(run_dir))


def split_batches(config: DataConfig, split: str) -> ReportingDataLoader | list:
    """Batches of one split in a fixed order, without augmentation. `all` is every image under
    data.path (folder or shards), whatever split each belongs to."""
    if split == ALL:
        if config.source == "shapes":
            raise ValueError(
                "split=all scores every image of a folder or shards; the shapes are generated: "
                "use split=test (or val) with data=shapes."
            )
        everything = replace(config, val_fraction=0.0, test_fraction=0.0, val_path="", test_path="")
        return make_loader(build_dataset(everything, "train", train=False), everything, False)
    if split != "train" and not has_split(config, split):
        return []
    return make_loader(build_dataset(config, split, train=False), config, False)


def held_out_prompts(config: DataConfig, split: str, count: int) -> list[str]:
    """The first `count` distinct, non-empty captions of the split."""
    return caption_prompts(split_batches(config, split), count).prompts


def held_out_images(config: DataConfig, split: str, count: int) -> torch.Tensor:
    """The first `count` images of the split, (S, 3, H, W) in [-1, 1]."""
    images = first_images(split_batches(config, split), count)
    if images.shape[0] == 0:
        raise ValueError(
            f"the {split} split of the data holds no images: choose another split (split=...)."
        )
    return images
