"""Encoded shards (codes + CLIP embeddings) as a dataset for stage two.

`EncodedDataset` is map-style over the memory-mapped shards of one split, so Lightning's
distributed sampler splits it between ranks and the DataLoader between workers. Before any
shard is read, the manifest is checked against the tokenizer in the run directory: codes
from another tokenizer would train a generator that decodes to noise. Shards encoded with
`tokens=true` also give each sample the CLIP's token features; `check_token_features` refuses
shards without them for a conditioning that reads them.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from generator.shards import (
    EncodedShard,
    Manifest,
    ShardMismatchError,
    TokenizerIdentity,
    read_manifest,
    read_shard,
    tokenizer_differences,
)
from tokenizer.base.run_dir import RunDir

NO_TEXT_TOKENS = torch.zeros(0, 0)  # a sample's text tokens in shards without token features
NO_TEXT_MASK = torch.zeros(0, dtype=torch.bool)
NO_IMAGE_TOKENS = torch.zeros(0, 0)


class EncodedSample(NamedTuple):
    codes: torch.Tensor  # (h*w,) long, row by row
    image_embedding: torch.Tensor  # (E,) float32
    text_embedding: torch.Tensor  # (E,) float32, zeros where has_text is False
    has_text: torch.Tensor  # () bool: the sample has a caption and a text embedding
    caption: str  # "" where there is none
    # the CLIP's token features, empty (0, 0), (0,), (0, 0) where the shards have none:
    text_tokens: torch.Tensor = NO_TEXT_TOKENS  # (L, W) float32, zeros past the caption
    text_mask: torch.Tensor = NO_TEXT_MASK  # (L,) bool, True at the caption's tokens
    image_tokens: torch.Tensor = NO_IMAGE_TOKENS  # (Np, W') float32


def check_tokenizer(manifest: Manifest, run_dir: Path) -> None:
    """Refuse shards that the tokenizer in RUN/tokenizer did not make."""
    run = RunDir(run_dir)
    plan = manifest.plan
    made_with = TokenizerIdentity(plan.tokenizer_fingerprint, plan.num_codes, plan.grid_size)
    differences = tokenizer_differences(
        run.tokenizer,
        made_with,
        f"the shards in {run.encoded} can only be used with the tokenizer that made them; "
        "put it back or train and encode again.",
    )
    if differences:
        raise ShardMismatchError(
            f"the shards in {run.encoded} were made by another tokenizer than {run.tokenizer} "
            f"(it has {', '.join(differences)}): run scripts/encode.py run_dir={run_dir} "
            "overwrite=true again."
        )


def check_token_features(manifest: Manifest, needs_tokens: bool, run_dir: str | Path) -> None:
    """Refuse shards without CLIP token features for a conditioning that reads them."""
    if needs_tokens and not manifest.plan.tokens:
        raise ValueError(
            "the generator's conditioning needs CLIP token features, but the shards in "
            f"{RunDir(run_dir).encoded} have none: run scripts/encode.py run_dir={run_dir} "
            "tokens=true overwrite=true."
        )


def load_manifest(run_dir: str | Path) -> Manifest:
    """RUN/encoded/manifest.json, checked against RUN/tokenizer."""
    run_dir = Path(run_dir)
    manifest = read_manifest(RunDir(run_dir).encoded)
    check_tokenizer(manifest, run_dir)
    return manifest


class EncodedDataset(Dataset):
    """One split of RUN/encoded. Shards are opened lazily, at most `max_open_shards` at once
    (each memory map holds a file descriptor), and never pickled into DataLoader workers."""

    def __init__(
        self,
        run_dir: str | Path,
        split: str,
        manifest: Manifest | None = None,
        max_open_shards: int = 64,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.manifest = manifest if manifest is not None else load_manifest(self.run_dir)
        record = self.manifest.split(split)
        self.paths = [RunDir(self.run_dir).encoded / shard.file for shard in record.shards]
        counts = [shard.num_samples for shard in record.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        plan = self.manifest.plan
        self.embed_dim = plan.embed_dim
        self.text_length = plan.text_token_shape[0] if plan.tokens else 0  # L; 0 without tokens
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, EncodedShard] = OrderedDict()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}  # a pickled memmap is a full copy

    def _shard(self, index: int) -> EncodedShard:
        shard = self._open.pop(index, None)
        if shard is None:
            shard = read_shard(self.paths[index])
            if len(self._open) >= self.max_open_shards:
                self._open.popitem(last=False)
        self._open[index] = shard  # most recently used last
        return shard

    def __getitem__(self, index: int) -> EncodedSample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} encoded samples")
        shard_number = bisect.bisect_right(self.starts, index) - 1
        shard, row = self._shard(shard_number), index - self.starts[shard_number]
        has_text = bool(shard.has_caption[row])
        text_embedding = (
            torch.from_numpy(shard.text_embeddings[row].astype(np.float32))
            if has_text
            else torch.zeros(self.embed_dim)
        )
        return EncodedSample(
            codes=torch.from_numpy(shard.codes[row].astype(np.int64)).flatten(),
            image_embedding=torch.from_numpy(shard.image_embeddings[row].astype(np.float32)),
            text_embedding=text_embedding,
            has_text=torch.tensor(has_text),
            caption=shard.caption(row),
            **(self._token_features(shard, row) if self.text_length else {}),
        )

    def _token_features(self, shard: EncodedShard, row: int) -> dict[str, torch.Tensor]:
        """A sample's token features, its text tokens padded with zeros to the CLIP's L."""
        length = int(shard.text_lengths[row])
        text_tokens = np.zeros((self.text_length, shard.text_tokens.shape[2]), np.float32)
        text_tokens[:length] = shard.text_tokens[row, :length]
        return {
            "text_tokens": torch.from_numpy(text_tokens),
            "text_mask": torch.arange(self.text_length) < length,
            "image_tokens": torch.from_numpy(shard.image_tokens[row].astype(np.float32)),
        }


class EncodedDataModule(L.LightningDataModule):
    """Train and val loaders over RUN/encoded for stage two; the manifest is checked once."""

    def __init__(self, run_dir: str | Path, batch_size: int, num_workers: int = 2) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError("batch_size must be at least 1 and num_workers at least 0.")
        self.run_dir = Path(run_dir)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.datasets: dict[str, EncodedDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        manifest = load_manifest(self.run_dir)
        for record in manifest.splits:
            self.datasets[record.name] = EncodedDataset(self.run_dir, record.name, manifest)
        if "train" not in self.datasets:
            raise ValueError(
                f"{self.run_dir / 'encoded'} has no train split: run scripts/encode.py "
                f"run_dir={self.run_dir} splits=[train,val]."
            )

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        return self._loader("val", train=False) if "val" in self.datasets else []
