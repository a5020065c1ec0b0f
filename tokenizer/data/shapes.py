"""The built-in shapes benchmark as a dataset of Samples."""

import torch
from torch.utils.data import Dataset

from tokenizer.data.config import Sample
from tokenizer.shapes import SPLITS, ShapesConfig, ShapesExample, generate


class ShapesDataset(Dataset):
    """The built-in shapes benchmark: example `index` is drawn from (seed, split, index)."""

    def __init__(self, config: ShapesConfig, split: str, length: int) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {SPLITS}.")
        self.config, self.split, self.length = config, split, length

    def __len__(self) -> int:
        return self.length

    def example(self, index: int) -> ShapesExample:
        """The image as uint8, its scene (attributes) and its caption."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} shapes examples")
        return generate(self.config, self.split, index)

    def __getitem__(self, index: int) -> Sample:
        example = self.example(index)
        image = torch.from_numpy(example.image).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
        return Sample(image, example.caption)
