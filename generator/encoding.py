"""Run the tokenizer and CLIP once over a dataset's splits and write encoded shards.

Shard k of a split holds the samples at positions [k * shard_size, (k + 1) * shard_size) of
the split's deterministic order: datasets are built with train=False, so nothing is shuffled
or augmented. For a map-style dataset (shapes, image folder) a position is the dataset index,
and an unreadable file leaves its position empty; for a WebDataset stream it is the count of
samples read so far. A rerun keeps the shards on disk and starts at the first missing shard's
first position, and tokenizer/CLIP batches never cross a shard boundary, so a resumed encode
writes the same bytes as one uninterrupted run. See generator/shards.py for the format.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterable, Iterator, Sequence
from itertools import groupby, islice
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, default_collate
from tqdm import tqdm

import tokenizer.base.files
from generator.shards import (
    DONE_FILE,
    EMBEDDING_DTYPE,
    MANIFEST_FILE,
    PLAN_FILE,
    SHARD_PATTERN,
    EncodedShard,
    EncodingPlan,
    Manifest,
    ShardInfo,
    ShardMismatchError,
    ShardRecord,
    SplitRecord,
    codes_dtype,
    pack_captions,
    read_json,
    read_manifest,
    read_shard_info,
    shard_index,
    shard_name,
    tokenizer_fingerprint,
    write_json,
    write_shard,
)
from tokenizer import VQGAN
from tokenizer.base.configs import config_to_dict
from tokenizer.base.run_dir import RunDir
from tokenizer.data import DataConfig, ReportingDataLoader, Sample, build_dataset, has_split
from tokenizer.shapes import SPLITS

if TYPE_CHECKING:
    from generator.clip import CLIPEncoder

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Positioned(NamedTuple):
    position: int  # in the split's deterministic order
    sample: Sample


class EncodedBatch(NamedTuple):
    codes: np.ndarray  # (B, h, w) codes_dtype
    image_embeddings: np.ndarray  # (B, E) float16
    text_embeddings: np.ndarray  # (B, E) float16, zeros where a sample has no caption
    captions: list[str]


class EncodeOutcome(NamedTuple):
    manifest: Manifest
    already_done: bool  # every requested split was encoded before: nothing ran


# ---------------------------------------------------------------------------------------------
# Reading a split in order


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


# ---------------------------------------------------------------------------------------------
# Encoding


@torch.inference_mode()
def encode_batch(
    vqgan: VQGAN, clip: CLIPEncoder, samples: list[Sample], plan: EncodingPlan
) -> EncodedBatch:
    """Codes and CLIP embeddings of one batch of samples, as the shard stores them."""
    device = next(vqgan.parameters()).device
    images = torch.stack([sample.image for sample in samples]).to(device)  # (B, 3, H, W)
    captions = [sample.caption.strip() for sample in samples]
    codes = vqgan.encode(images)  # (B, h, w)
    image_embeddings = clip.encode_image(images).float()  # (B, E)
    text_embeddings = torch.zeros_like(image_embeddings)  # (B, E)
    captioned = [i for i, caption in enumerate(captions) if caption]
    if captioned:
        text_embeddings[captioned] = clip.encode_text([captions[i] for i in captioned]).float()
    return EncodedBatch(
        codes=codes.cpu().numpy().astype(plan.codes_dtype),
        image_embeddings=image_embeddings.cpu().numpy().astype(plan.embedding_dtype),
        text_embeddings=text_embeddings.cpu().numpy().astype(plan.embedding_dtype),
        captions=captions,
    )


def build_shard(batches: list[EncodedBatch]) -> EncodedShard:
    captions = [caption for batch in batches for caption in batch.captions]
    has_caption = np.array([bool(caption) for caption in captions], dtype=np.bool_)
    caption_bytes, caption_offsets = pack_captions(captions)
    text_embeddings = np.concatenate([batch.text_embeddings for batch in batches])
    return EncodedShard(
        codes=np.concatenate([batch.codes for batch in batches]),
        image_embeddings=np.concatenate([batch.image_embeddings for batch in batches]),
        text_embeddings=text_embeddings if has_caption.any() else None,
        has_caption=has_caption,
        caption_bytes=caption_bytes,
        caption_offsets=caption_offsets,
    )


def _dataset_length(dataset: Dataset) -> int | None:
    return None if isinstance(dataset, IterableDataset) else len(dataset)


def first_missing_shard(split_dir: Path, dataset_length: int | None) -> int:
    """Where a rerun starts; refuses shards written from a dataset of another length."""
    written = {shard_index(path): path for path in split_dir.glob(SHARD_PATTERN)}
    index = 0
    while index in written:
        recorded = read_shard_info(written[index]).dataset_length
        if recorded != dataset_length:
            raise ShardMismatchError(
                f"{written[index]} was encoded from a {split_dir.name} split of {recorded} "
                f"samples, but it now has {dataset_length}: the data changed. Pass "
                "overwrite=true to encode it again from the start."
            )
        index += 1
    return index


def remove_temporaries(folder: Path) -> None:
    """Files a killed process left half-written (shards, records, the manifest): they are never
    read, and written again."""
    for stray in tokenizer.base.files.remove_temporaries(folder):
        logger.info("removed the half-written %s", stray)


def split_record(encoded_dir: Path, split: str) -> SplitRecord:
    shards = []
    for path in sorted((encoded_dir / split).glob(SHARD_PATTERN)):
        info = read_shard_info(path)
        file = path.relative_to(encoded_dir).as_posix()
        shards.append(ShardRecord(file, info.num_samples, info.num_captioned))
    return SplitRecord(
        name=split,
        num_samples=sum(shard.num_samples for shard in shards),
        num_captioned=sum(shard.num_captioned for shard in shards),
        shards=tuple(shards),
    )


def encode_split(
    encoded_dir: Path,
    split: str,
    dataset: Dataset,
    vqgan: VQGAN,
    clip: CLIPEncoder,
    plan: EncodingPlan,
    num_workers: int,
) -> SplitRecord:
    """Encode one split into RUN/encoded/<split>/, resuming after the shards already there."""
    split_dir = encoded_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(split_dir)
    length = _dataset_length(dataset)
    start = first_missing_shard(split_dir, length) * plan.shard_size
    if start:
        logger.info("%s: resuming at position %d, after the shards already written", split, start)
    samples = ordered_samples(dataset, start, plan.batch_size, num_workers)
    with tqdm(total=length, initial=start, unit="img", desc=f"encode {split}") as progress:
        for index, shard_samples in groupby(samples, key=lambda s: s.position // plan.shard_size):
            batches = []
            for batch in chunked(shard_samples, plan.batch_size):
                batches.append(encode_batch(vqgan, clip, [p.sample for p in batch], plan))
                progress.update(batch[-1].position + 1 - progress.n)
            shard = build_shard(batches)
            info = ShardInfo(
                split=split,
                first_position=index * plan.shard_size,
                num_samples=len(shard.codes),
                num_captioned=int(shard.has_caption.sum()),
                dataset_length=length,
            )
            write_shard(split_dir / shard_name(index), shard, info)
    record = split_record(encoded_dir, split)
    write_json(split_dir / DONE_FILE, record)
    return record


# ---------------------------------------------------------------------------------------------
# The run directory


def order_settings(config: DataConfig) -> dict:
    """The data settings that decide which sample lands at which position of a split."""
    settings = config_to_dict(config)
    del settings["batch_size"]  # the plan records it on its own
    if config.source != "webdataset":
        del settings["num_workers"]  # workers interleave a stream, but not indexed samples
    for train_only in ("random_flip", "random_crop", "shuffle_buffer"):
        del settings[train_only]  # encoding reads every split as train=False
    return settings


def make_plan(
    tokenizer_dir: Path, vqgan: VQGAN, clip: CLIPEncoder, data_config: DataConfig, shard_size: int
) -> EncodingPlan:
    return EncodingPlan(
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer_dir),
        clip_fingerprint=clip.fingerprint(),
        num_codes=vqgan.num_codes,
        grid_size=vqgan.config.grid_size,
        image_size=vqgan.config.image_size,
        embed_dim=clip.embed_dim,
        codes_dtype=codes_dtype(vqgan.num_codes),
        embedding_dtype=EMBEDDING_DTYPE,
        shard_size=shard_size,
        batch_size=data_config.batch_size,
        data=order_settings(data_config),
    )


def plan_differences(found: EncodingPlan, wanted: EncodingPlan) -> list[str]:
    """What differs between two plans, in words."""
    differences = []
    for field in dataclasses.fields(EncodingPlan):
        old, new = getattr(found, field.name), getattr(wanted, field.name)
        if old == new:
            continue
        if field.name == "tokenizer_fingerprint":
            differences.append(f"another tokenizer (sha256 {old[:12]}…, this one {new[:12]}…)")
        elif field.name == "clip_fingerprint":
            differences.append(f"another CLIP (sha256 {old[:12]}…, this one {new[:12]}…)")
        elif field.name == "data":
            keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            differences += [f"data.{k}={old.get(k)!r} (now {new.get(k)!r})" for k in keys]
        else:
            differences.append(f"{field.name}={old!r} (now {new!r})")
    return differences


def prepare_encoded_dir(encoded_dir: Path, plan: EncodingPlan, overwrite: bool) -> None:
    """Start RUN/encoded with this plan, or check that the shards there follow it."""
    if overwrite and encoded_dir.exists():
        logger.info("overwrite=true: deleting %s", encoded_dir)
        shutil.rmtree(encoded_dir)
    plan_path = encoded_dir / PLAN_FILE
    if plan_path.is_file():
        differences = plan_differences(read_json(EncodingPlan, plan_path), plan)
        if differences:
            raise ShardMismatchError(
                f"{encoded_dir} holds shards made with {'; '.join(differences)}. Pass "
                "overwrite=true to delete them and encode again, or choose another run_dir."
            )
    elif any(encoded_dir.glob(f"*/{SHARD_PATTERN}")):
        raise ShardMismatchError(
            f"{encoded_dir} holds shards but no {PLAN_FILE} that says what made them: pass "
            "overwrite=true to delete them and encode again, or choose another run_dir."
        )
    else:
        write_json(plan_path, plan)


def encode_run(
    run_dir: str | Path,
    data_config: DataConfig,
    clip: CLIPEncoder,
    splits: Sequence[str] = ("train", "val"),
    shard_size: int = 4096,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> EncodeOutcome:
    """Encode `splits` of the data with RUN/tokenizer and `clip` into RUN/encoded.

    The data is read at the tokenizer's image size. Resumes an interrupted encode; refuses
    shards that another tokenizer, CLIP or data setting made unless `overwrite`.
    """
    run_dir = Path(run_dir)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise ValueError(f"splits={list(splits)}: choose one or more of {list(SPLITS)}.")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: use at least 1 sample per shard.")
    missing = [split for split in splits if not has_split(data_config, split)]
    if missing:
        raise ValueError(
            f"the data config has no {' or '.join(missing)} split: leave it out of splits, or "
            "give the data one (data.num_val, data.val_path or data.val_fraction, ...)."
        )
    encoded_dir, tokenizer_dir = RunDir(run_dir).encoded, RunDir(run_dir).tokenizer
    vqgan = VQGAN.from_pretrained(tokenizer_dir, device=device)
    data_config = dataclasses.replace(data_config, image_size=vqgan.config.image_size)
    plan = make_plan(tokenizer_dir, vqgan, clip, data_config, shard_size)
    prepare_encoded_dir(encoded_dir, plan, overwrite)
    remove_temporaries(encoded_dir)

    def done(split: str) -> bool:
        return (encoded_dir / split / DONE_FILE).is_file()

    if (encoded_dir / MANIFEST_FILE).is_file() and all(done(split) for split in splits):
        return EncodeOutcome(read_manifest(encoded_dir), already_done=True)
    for split in splits:
        if not done(split):
            dataset = build_dataset(data_config, split, train=False)
            encode_split(encoded_dir, split, dataset, vqgan, clip, plan, data_config.num_workers)
    records = [read_json(SplitRecord, encoded_dir / s / DONE_FILE) for s in SPLITS if done(s)]
    manifest = Manifest(plan=plan, splits=tuple(records))
    write_json(encoded_dir / MANIFEST_FILE, manifest)
    return EncodeOutcome(manifest, already_done=False)
