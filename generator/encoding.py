"""Run the tokenizer and CLIP once over a dataset's splits and write encoded shards.

Shard k of a split holds the samples at positions [k * shard_size, (k + 1) * shard_size) of
the split's deterministic order (generator/split_order.py): datasets are built with
train=False, so nothing is shuffled or augmented. With `tokens`, a shard also holds the CLIP's
per-token text and per-patch image features, for the conditionings that read them. A rerun
keeps the shards on disk and starts at the first missing shard's first position, and
tokenizer/CLIP batches never cross a shard boundary, so a resumed encode writes the same bytes
as one uninterrupted run. See generator/shards.py for the format.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset
from tqdm import tqdm

import tokenizer.base.files
from generator.clip.encoder import text_feature_shape
from generator.shards import (
    DONE_FILE,
    EMBEDDING_DTYPE,
    MANIFEST_FILE,
    PLAN_FILE,
    SHARD_PATTERN,
    TEXT_LENGTH_DTYPE,
    TOKEN_DTYPE,
    EncodedShard,
    EncodingPlan,
    Manifest,
    ShardInfo,
    ShardMismatchError,
    ShardRecord,
    SplitRecord,
    codes_dtype,
    pack_captions,
    pad_text_tokens,
    read_json,
    read_manifest,
    read_shard_info,
    shard_index,
    shard_name,
    tokenizer_fingerprint,
    write_json,
    write_shard,
)
from generator.split_order import chunked, ordered_samples
from tokenizer import VQGAN
from tokenizer.base.configs import config_to_dict
from tokenizer.base.run_dir import RunDir
from tokenizer.data import DataConfig, Sample, build_dataset, has_split
from tokenizer.shapes import SPLITS

if TYPE_CHECKING:
    from generator.clip import CLIPEncoder
    from generator.clip.encoder import TextTokens

logger = logging.getLogger(__name__)
TOKEN_SHAPES = ("text_token_shape", "image_token_shape")  # follow the CLIP and the features


class TokenRows(NamedTuple):
    """One batch's CLIP token features, as a shard stores them."""

    text_tokens: np.ndarray  # (B, Lb, W) float16, Lb the batch's longest caption in tokens
    text_lengths: np.ndarray  # (B,) int16, 0 where a sample has no caption
    image_tokens: np.ndarray  # (B, Np, W') float16


class EncodedBatch(NamedTuple):
    codes: np.ndarray  # (B, h, w) codes_dtype
    image_embeddings: np.ndarray  # (B, E) float16
    text_embeddings: np.ndarray  # (B, E) float16, zeros where a sample has no caption
    captions: list[str]
    tokens: TokenRows | None  # None where the plan stores no token features


class CLIPOutputs(NamedTuple):
    """What the CLIP makes of one batch, as float32 on its device."""

    image_embeddings: torch.Tensor  # (B, E)
    text_embeddings: torch.Tensor | None  # (c, E), one per captioned sample; None where none
    text_tokens: TextTokens | None  # of the captioned samples; None without token features
    image_tokens: torch.Tensor | None  # (B, Np, W'); None without token features


class EncodeOutcome(NamedTuple):
    manifest: Manifest
    already_done: bool  # every requested split was encoded before: nothing ran


# ---------------------------------------------------------------------------------------------
# Encoding


def run_clip(
    clip: CLIPEncoder,
    images: torch.Tensor,
    captions: list[str],
    tokens: bool,
    word_embeddings: bool = False,
) -> CLIPOutputs:
    """The CLIP over a batch's images and its non-empty captions; with `tokens`, the pooled
    embeddings come from the same pass as the token features (the text's with each token's word
    embedding where `word_embeddings`)."""
    if not tokens:
        text = clip.encode_text(captions).float() if captions else None
        return CLIPOutputs(clip.encode_image(images).float(), text, None, None)
    image = clip.encode_image_tokens(images)
    text = clip.encode_text_tokens(captions, word_embeddings=word_embeddings) if captions else None
    return CLIPOutputs(
        image_embeddings=image.pooled.float(),
        text_embeddings=text.pooled.float() if text is not None else None,
        text_tokens=text,
        image_tokens=image.features.float(),
    )


def token_rows(outputs: CLIPOutputs, captioned: list[int], plan: EncodingPlan) -> TokenRows:
    """The batch's token features: each caption's real tokens, then zeros up to the batch's
    longest; no tokens at all for a sample without a caption."""
    batch_size, width = len(outputs.image_embeddings), plan.text_token_shape[1]
    lengths = torch.zeros(batch_size, dtype=torch.long)
    text_tokens = torch.zeros(batch_size, 0, width)
    text = outputs.text_tokens
    if text is not None:
        real = text.mask.sum(dim=1)  # (c,)
        positions = torch.arange(text.mask.shape[1], device=real.device)
        if not torch.equal(text.mask, positions < real[:, None]):
            raise ValueError(
                "the CLIP's text token mask has padding before a real token, and the shards "
                "keep each caption's tokens first: use a CLIP whose tokenizer pads at the end."
            )
        longest = int(real.max())
        text_tokens = torch.zeros(batch_size, longest, width)
        real_tokens = text.features[:, :longest].float() * text.mask[:, :longest, None]
        text_tokens[captioned] = real_tokens.cpu()
        lengths[captioned] = real.cpu()
    return TokenRows(
        text_tokens=text_tokens.numpy().astype(TOKEN_DTYPE),
        text_lengths=lengths.numpy().astype(TEXT_LENGTH_DTYPE),
        image_tokens=outputs.image_tokens.cpu().numpy().astype(TOKEN_DTYPE),
    )


@torch.inference_mode()
def encode_batch(
    vqgan: VQGAN, clip: CLIPEncoder, samples: list[Sample], plan: EncodingPlan
) -> EncodedBatch:
    """Codes and CLIP embeddings (and token features) of one batch, as the shard stores them."""
    device = next(vqgan.parameters()).device
    images = torch.stack([sample.image for sample in samples]).to(device)  # (B, 3, H, W)
    captions = [sample.caption.strip() for sample in samples]
    codes = vqgan.encode(images)  # (B, h, w)
    captioned = [i for i, caption in enumerate(captions) if caption]
    texts = [captions[i] for i in captioned]
    outputs = run_clip(clip, images, texts, plan.tokens, plan.word_embeddings)
    text_embeddings = torch.zeros_like(outputs.image_embeddings)  # (B, E)
    if captioned:
        text_embeddings[captioned] = outputs.text_embeddings
    return EncodedBatch(
        codes=codes.cpu().numpy().astype(plan.codes_dtype),
        image_embeddings=outputs.image_embeddings.cpu().numpy().astype(plan.embedding_dtype),
        text_embeddings=text_embeddings.cpu().numpy().astype(plan.embedding_dtype),
        captions=captions,
        tokens=token_rows(outputs, captioned, plan) if plan.tokens else None,
    )


def shard_tokens(batches: list[EncodedBatch]) -> dict[str, np.ndarray]:
    """The shard's token arrays from its batches' (none without token features): text tokens
    padded with zeros to the shard's longest caption."""
    rows = [batch.tokens for batch in batches if batch.tokens is not None]
    if not rows:
        return {}
    return {
        "text_tokens": pad_text_tokens([row.text_tokens for row in rows]),
        "text_lengths": np.concatenate([row.text_lengths for row in rows]),
        "image_tokens": np.concatenate([row.image_tokens for row in rows]),
    }


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
        **shard_tokens(batches),
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
    tokenizer_dir: Path,
    vqgan: VQGAN,
    clip: CLIPEncoder,
    data_config: DataConfig,
    shard_size: int,
    tokens: bool = False,
    word_embeddings: bool = False,
) -> EncodingPlan:
    """The plan of an encode; with `tokens`, asking the CLIP for its token shapes refuses a CLIP
    without per-token outputs before any work."""
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
        tokens=tokens,
        word_embeddings=word_embeddings,
        text_token_shape=text_feature_shape(clip, word_embeddings) if tokens else None,
        image_token_shape=tuple(clip.image_token_shape) if tokens else None,
    )


def plan_differences(found: EncodingPlan, wanted: EncodingPlan) -> list[str]:
    """What differs between two plans, in words."""
    differences = []
    features = (found.tokens, found.word_embeddings) != (wanted.tokens, wanted.word_embeddings)
    for field in dataclasses.fields(EncodingPlan):
        old, new = getattr(found, field.name), getattr(wanted, field.name)
        if old == new or (field.name in TOKEN_SHAPES and features):
            continue
        if field.name == "tokenizer_fingerprint":
            differences.append(f"another tokenizer (sha256 {old[:12]}…, this one {new[:12]}…)")
        elif field.name == "clip_fingerprint":
            differences.append(f"another CLIP (sha256 {old[:12]}…, this one {new[:12]}…)")
        elif field.name in ("tokens", "word_embeddings"):
            name = field.name
            differences.append(f"{name}={str(old).lower()} (now {name}={str(new).lower()})")
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
    tokens: bool = False,
    word_embeddings: bool = False,
) -> EncodeOutcome:
    """Encode `splits` of the data with RUN/tokenizer and `clip` into RUN/encoded, with the
    CLIP's token features where `tokens` (the text's with word embeddings where
    `word_embeddings`; see generator/clip/encoder.py).

    The data is read at the tokenizer's image size. Resumes an interrupted encode; refuses
    shards that another tokenizer, CLIP, data setting or choice of `tokens` made unless
    `overwrite`.
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
    run = RunDir(run_dir)
    encoded_dir, tokenizer_dir = run.encoded, run.tokenizer
    vqgan = VQGAN.from_pretrained(tokenizer_dir, device=device)
    data_config = dataclasses.replace(data_config, image_size=vqgan.config.image_size)
    plan = make_plan(tokenizer_dir, vqgan, clip, data_config, shard_size, tokens, word_embeddings)
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
