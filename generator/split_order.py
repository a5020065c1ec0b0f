"""A split's samples in its deterministic order, each with its position: what
generator/encoding.py reads into shards.

For a map-style dataset (shapes, image folder) a position is the dataset index, and an
unreadable file leaves its position empty; for a WebDataset stream it is the count of samples
read so far.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import NamedTuple, TypeVar

from torch.utils.data import Dataset, IterableDataset, default_collate

from tokenizer.data import ReportingDataLoader, Sample

T = TypeVar("T")


class Positioned(NamedTuple):
    position: int  # in the split's deterministic order
    sample: Sample


class _ReadOrSkip(Dataset):
    """index -> Positioned, or None where the file cannot be read.

    FolderDataset's `__getitem__` stands the next file in for an unreadable one, which would
    encode that file twice; its `load` says None instead, and the position stays empty.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.skip_log = getattr(dataset, "skip_log", None)  # for ReportingDataLoader

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Positioned | None:
        load = getattr(self.dataset, "load", None)
        sample = load(index) if load is not None else self.dataset[index]
        return None if sample is None else Positioned(index, sample)


def _collate_present(items: list) -> Positioned | Sample | None:
    """A batch of the items that could be read; None where none could."""
    present = [item for item in items if item is not None]
    return default_collate(present) if present else None


def ordered_samples(
    dataset: Dataset, start: int, batch_size: int, num_workers: int
) -> Iterator[Positioned]:
    """The split's samples from position `start` on, in order, read by DataLoader workers.

    A stream cannot seek: its first `start` samples are read again and dropped.
    """
    options = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_present)
    if isinstance(dataset, IterableDataset):
        position = 0
        for batch in ReportingDataLoader(dataset, **options):
            for image, caption in zip(batch.image, batch.caption, strict=True):
                if position >= start:
                    yield Positioned(position, Sample(image, caption))
                position += 1
        return
    sampler = range(start, len(dataset))
    for batch in ReportingDataLoader(_ReadOrSkip(dataset), sampler=sampler, **options):
        if batch is None:
            continue
        images, captions = batch.sample
        for position, image, caption in zip(batch.position.tolist(), images, captions, strict=True):
            yield Positioned(position, Sample(image, caption))


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
