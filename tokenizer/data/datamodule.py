"""`ImageDataModule`: the train, val and test loaders of any source, for Lightning.

Apart from tokenizer.data's other modules, which the sampling scripts load without Lightning.
"""

import lightning as L
from torch.utils.data import DataLoader, Dataset

from tokenizer.data.config import DataConfig
from tokenizer.data.loading import build_dataset, make_loader
from tokenizer.data.splits import has_split
from tokenizer.shapes import SPLITS


class ImageDataModule(L.LightningDataModule):
    """Train/val/test loaders for any source. Under DDP, map-style datasets (shapes, folders)
    get Lightning's distributed sampler: every sample on one rank, once per epoch, where the
    split's size divides by the number of ranks (else up to ranks - 1 samples are repeated to
    even the ranks out). WebDataset shards are split between ranks by ShardDataset."""

    def __init__(self, config: DataConfig) -> None:
        super().__init__()
        self.config = config
        self.datasets: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for split in wanted.get(stage, SPLITS):
            if split not in self.datasets and has_split(self.config, split):
                self.datasets[split] = build_dataset(self.config, split)

    def _loader(self, split: str) -> DataLoader | list:
        if not has_split(self.config, split):
            return []  # Lightning runs no loop for an empty list
        if split not in self.datasets:
            self.datasets[split] = build_dataset(self.config, split)
        return make_loader(self.datasets[split], self.config, train=split == "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test")
