"""WebDataset tar shards in the img2dataset layout, split between data-parallel ranks and then
between DataLoader workers, streamed and never written to disk.
"""

import json
import logging
import os
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import webdataset as wds
from torch.utils.data import IterableDataset

from tokenizer.data.config import DataConfig, Sample
from tokenizer.data.images import ImageTransform, load_rgb
from tokenizer.data.skipping import SkipLog
from tokenizer.data.splits import split_of, split_source

logger = logging.getLogger(__name__)

SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the img2dataset layout


class RankSplit(NamedTuple):
    """This process's place among data-parallel ranks: (0, 1) without DDP or FSDP."""

    rank: int
    world_size: int


def current_rank_split() -> RankSplit:
    """The rank as torchrun and SLURM's environment or an initialised process group gives it."""
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    return RankSplit(rank, world_size)


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def shard_urls(path: str) -> list[str]:
    """A .tar file, a folder of .tar files, or a brace pattern such as "data/{000..099}.tar"."""
    expanded = Path(path).expanduser()
    if expanded.is_dir():
        urls = sorted(str(p) for p in expanded.glob("*.tar"))
        if not urls:
            raise ValueError(f"no .tar shards in {expanded}: check data.path.")
        return urls
    urls = list(wds.shardlists.expand_urls(str(expanded) if not _is_remote(path) else path))
    missing = [url for url in urls if not _is_remote(url) and not os.path.isfile(url)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards do not exist (first: {missing[0]}): "
            "set data.path to a .tar file, a folder of them, or a pattern like data/{000..009}.tar."
        )
    return urls


class ShardDataset(IterableDataset):
    """WebDataset tar shards in the img2dataset layout: jpg/png/webp + txt (+ json).

    Shards are split between ranks (`ranks`, by default this process's, taken when the dataset
    is made: under Lightning that is after the process group started, and DataLoader workers,
    however started, inherit it) and then between DataLoader workers, so each shard is read
    once per pass over the data. Ranks may hold different numbers of samples; training counts
    steps, and a rank at the end of its shards starts its next pass. A sample that cannot be
    decoded, and a member whose name is absolute or climbs out with '..', is recorded in
    `skip_log` and dropped. Members are streamed and never written to disk.
    """

    def __init__(
        self,
        config: DataConfig,
        split: str,
        train: bool | None = None,
        ranks: RankSplit | None = None,
    ) -> None:
        self.source = split_source(config, split)
        self.urls = shard_urls(self.source.path)
        self.ranks = ranks if ranks is not None else current_rank_split()
        if len(self.urls) < self.ranks.world_size:
            raise ValueError(
                f"{len(self.urls)} shard(s) in {self.source.path} for {self.ranks.world_size} "
                "ranks: every rank needs a shard of its own, so write the data as more shards "
                "(img2dataset's number_sample_per_shard) or train on fewer devices."
            )
        self.train = split == "train" if train is None else train
        self.transform = ImageTransform(config, train=self.train)
        self.max_pixels, self.alpha_background = config.max_image_pixels, config.alpha_background
        self.image_size, self.shuffle_buffer = config.image_size, config.shuffle_buffer
        self.skip_log = SkipLog()
        per_rank = len(self.urls) // self.ranks.world_size
        if per_rank < max(config.num_workers, 1):
            logger.warning(
                "%d shard(s) per rank for %d DataLoader workers: some workers will have nothing "
                "to read.",
                per_rank,
                config.num_workers,
            )

    def _on_error(self, error: Exception) -> bool:
        """WebDataset's handler for unreadable shards: record, then go on to the next one."""
        names = [a for a in error.args[1:] if isinstance(a, str)]  # WebDataset appends the url
        self.skip_log.record(names[-1] if names else "(a shard)", error)
        return True

    def _safe_member(self, name: str) -> bool:
        """False (and a record) for a tar member named by an absolute path or with a '..' part:
        no real sample key looks like that, and such names are how tar files escape a folder."""
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts:
            self.skip_log.record(name, "unsafe tar member name (absolute or with '..')")
            return False
        return True

    def _wanted(self, sample: dict) -> bool:
        source = self.source
        return (
            split_of(sample["__key__"], source.val_fraction, source.test_fraction) == source.split
        )

    def _decode(self, sample: dict) -> Sample | None:
        where = f"{sample.get('__url__', '?')}:{sample['__key__']}"
        key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
        if key is None:
            self.skip_log.record(where, f"no image ({'/'.join(SHARD_IMAGE_KEYS)}) in the sample")
            return None
        try:
            image = load_rgb(sample[key], self.max_pixels, self.alpha_background, self.image_size)
        except Exception as error:  # Pillow raises many types on bad data; none may stop an epoch
            self.skip_log.record(f"{where}.{key}", error)
            return None
        return Sample(self.transform(image), self._caption(sample))

    @staticmethod
    def _caption(sample: dict) -> str:
        if "txt" in sample:
            return sample["txt"].decode("utf-8", errors="replace").strip()
        if "json" in sample:
            try:
                return str(json.loads(sample["json"]).get("caption", "")).strip()
            except (ValueError, AttributeError):
                return ""
        return ""

    def _split_by_rank(self, urls):
        """WebDataset's node splitter, with this dataset's ranks rather than the environment's."""
        return islice(urls, self.ranks.rank, None, self.ranks.world_size)

    def __iter__(self):
        pipeline = wds.WebDataset(
            self.urls,
            shardshuffle=len(self.urls) if self.train else False,
            nodesplitter=self._split_by_rank,
            workersplitter=wds.split_by_worker,
            handler=self._on_error,
            select_files=self._safe_member,
            empty_check=False,
        )
        if self.source.split is not None:
            pipeline = pipeline.select(self._wanted)
        if self.train and self.shuffle_buffer > 1:
            pipeline = pipeline.shuffle(self.shuffle_buffer)
        yield from pipeline.map(self._decode, handler=self._on_error)
