"""The on-disk format of encoded shards: what scripts/encode.py writes and stage two reads.

    RUN/encoded/
      plan.json                         how the shards are made (tokenizer, CLIP, shard size,
                                        data order); written before the first shard
      <split>/shard-000000.safetensors  one file per `shard_size` positions of the split's order
      <split>/done.json                 the split's shard list, once its last shard is written
      manifest.json                     the plan and every finished split; written last

A shard is one safetensors file holding, for its N samples:

    codes             (N, h, w)  uint16 (int32 for codebooks over 65,536 codes)
    image_embeddings  (N, E)     float16, l2-normalised CLIP image embeddings
    text_embeddings   (N, E)     float16, zeros where a sample has no caption;
                                 absent from a shard where no sample has one
    has_caption       (N,)       bool
    caption_bytes     (T,)       uint8, the UTF-8 captions one after another
    caption_offsets   (N + 1,)   int64, caption i is caption_bytes[offsets[i]:offsets[i + 1]]

and, where the plan says `tokens: true` (scripts/encode.py tokens=true), the CLIP's per-token
features:

    text_tokens       (N, Lmax, W)  float16, the text tower's last-layer output per token (and
                                    its word embedding where the plan says `word_embeddings:
                                    true`, W twice the tower's width); Lmax is the shard's
                                    longest caption in tokens, and rows are zeros past each
                                    caption's length and for uncaptioned samples
    text_lengths      (N,)          int16, each caption's length in tokens, 0 where none
    image_tokens      (N, Np, W')   float16, the vision tower's per-patch output

The plan records the CLIP's full shapes, `text_token_shape` [L, W] (L its context length) and
`image_token_shape` [Np, W']; a reader pads text_tokens to L. Shards and plans written before
token features existed have none of these keys and read as `tokens: false`.

safetensors is plain JSON plus raw arrays: `read_shard` memory-maps the arrays straight out of
the file, and nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors.numpy

from tokenizer.base.configs import config_to_dict, dataclass_from_dict
from tokenizer.base.files import atomic_write_bytes, atomic_write_text
from tokenizer.base.run_dir import config_file, weights_file
from tokenizer.vqgan import VQGANConfig

FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
DONE_FILE = "done.json"
SHARD_PATTERN = "shard-*.safetensors"
METADATA_KEY = "encoded_shard"
EMBEDDING_DTYPE = "float16"
TOKEN_DTYPE = np.float16
TEXT_LENGTH_DTYPE = np.int16
CODES_DTYPES = ("uint16", "int32")
SAFETENSORS_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "U16": np.uint16,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "F16": np.float16,
    "F32": np.float32,
}


class ShardMismatchError(ValueError):
    """Encoded shards that do not belong to this tokenizer, CLIP or data."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def shard_index(path: Path) -> int:
    return int(path.name.removeprefix("shard-").removesuffix(".safetensors"))


def codes_dtype(num_codes: int) -> str:
    """The smallest integer type that holds every code of the codebook."""
    return "uint16" if num_codes <= 2**16 else "int32"


def file_sha256(paths: list[Path]) -> str:
    """One sha256 over the bytes of several files, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """sha256 of an exported tokenizer: its weights, then its config."""
    return file_sha256([weights_file(tokenizer_dir), config_file(tokenizer_dir)])


class TokenizerIdentity(NamedTuple):
    """The tokenizer something (shards, a generator) was made with."""

    fingerprint: str  # tokenizer_fingerprint
    num_codes: int
    grid_size: tuple[int, int]


def tokenizer_differences(
    tokenizer_dir: Path, expected: TokenizerIdentity, what_needs_it: str
) -> list[str]:
    """How the tokenizer exported in `tokenizer_dir` differs from `expected`, as phrases for an
    error message ("a codebook of 128 codes, not 64"); [] where it is the same tokenizer. A
    FileNotFoundError where there is none: `what_needs_it` says what cannot do without it."""
    if not weights_file(tokenizer_dir).is_file():
        raise FileNotFoundError(f"no tokenizer in {tokenizer_dir}: {what_needs_it}")
    config = VQGANConfig.load(tokenizer_dir)
    differences = []
    if config.quantizer.num_codes != expected.num_codes:
        differences.append(
            f"a codebook of {config.quantizer.num_codes} codes, not {expected.num_codes}"
        )
    if tuple(config.grid_size) != tuple(expected.grid_size):
        differences.append(f"a {config.grid_size} grid, not {expected.grid_size}")
    if not differences and tokenizer_fingerprint(tokenizer_dir) != expected.fingerprint:
        differences.append("other weights")
    return differences


# ---------------------------------------------------------------------------------------------
# Shards


class EncodedShard(NamedTuple):
    """The arrays of one shard, laid out as on disk (see the module docstring)."""

    codes: np.ndarray  # (N, h, w)
    image_embeddings: np.ndarray  # (N, E)
    text_embeddings: np.ndarray | None  # (N, E), None where no sample has a caption
    has_caption: np.ndarray  # (N,) bool
    caption_bytes: np.ndarray  # (T,) uint8
    caption_offsets: np.ndarray  # (N + 1,) int64
    text_tokens: np.ndarray | None = None  # (N, Lmax, W) float16; None without token features
    text_lengths: np.ndarray | None = None  # (N,) int16
    image_tokens: np.ndarray | None = None  # (N, Np, W') float16

    def caption(self, index: int) -> str:
        start, end = self.caption_offsets[index], self.caption_offsets[index + 1]
        return bytes(self.caption_bytes[start:end]).decode("utf-8")


def pack_captions(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Captions as (caption_bytes (T,) uint8, caption_offsets (N + 1,) int64)."""
    encoded = [caption.encode("utf-8") for caption in captions]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def pad_text_tokens(batches: list[np.ndarray]) -> np.ndarray:
    """Batches of text tokens (B, Lb, W), each as long as its longest caption, as one array
    (N, Lmax, W) padded with zeros to the longest of all."""
    longest = max(batch.shape[1] for batch in batches)
    padded = np.zeros((sum(map(len, batches)), longest, batches[0].shape[2]), TOKEN_DTYPE)
    start = 0
    for batch in batches:
        padded[start : start + len(batch), : batch.shape[1]] = batch
        start += len(batch)
    return padded


@dataclass
class ShardInfo:
    """What a shard file says about itself, in its safetensors metadata."""

    split: str
    first_position: int  # shard k covers positions [k * shard_size, (k + 1) * shard_size)
    num_samples: int  # fewer than shard_size where positions were unreadable, or at the end
    num_captioned: int
    dataset_length: int | None  # the split's length when encoded; None for a stream
    format_version: int = FORMAT_VERSION


def write_shard(path: Path, shard: EncodedShard, info: ShardInfo) -> Path:
    """Write one shard atomically: a killed process leaves the whole file or none of it."""
    arrays = {
        "codes": shard.codes,
        "image_embeddings": shard.image_embeddings,
        "has_caption": shard.has_caption,
        "caption_bytes": shard.caption_bytes,
        "caption_offsets": shard.caption_offsets,
    }
    optional = ("text_embeddings", "text_tokens", "text_lengths", "image_tokens")
    arrays |= {name: getattr(shard, name) for name in optional if getattr(shard, name) is not None}
    arrays = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    # safetensors writes metadata keys in hash order: one key keeps the file's bytes repeatable
    metadata = {METADATA_KEY: json.dumps(config_to_dict(info), sort_keys=True)}
    return atomic_write_bytes(path, safetensors.numpy.save(arrays, metadata=metadata))


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the byte offset where its data starts."""
    with open(path, "rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
    return header, 8 + header_size


def read_shard_info(path: Path) -> ShardInfo:
    metadata = read_header(path)[0].get("__metadata__", {})
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not an encoded shard: delete it and run scripts/encode.py.")
    return dataclass_from_dict(ShardInfo, json.loads(metadata[METADATA_KEY]), where=str(path))


def read_shard(path: Path) -> EncodedShard:
    """A shard's arrays, memory-mapped read-only: nothing is loaded until it is indexed."""
    header, data_start = read_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        arrays[name] = (
            raw[data_start + begin : data_start + end].view(dtype).reshape(entry["shape"])
        )
    return EncodedShard(
        codes=arrays["codes"],
        image_embeddings=arrays["image_embeddings"],
        text_embeddings=arrays.get("text_embeddings"),
        has_caption=arrays["has_caption"],
        caption_bytes=arrays["caption_bytes"],
        caption_offsets=arrays["caption_offsets"],
        text_tokens=arrays.get("text_tokens"),
        text_lengths=arrays.get("text_lengths"),
        image_tokens=arrays.get("image_tokens"),
    )


# ---------------------------------------------------------------------------------------------
# Plan and manifest


@dataclass
class EncodingPlan:
    """Everything that decides the bytes of the shards; a resumed encode must match it."""

    tokenizer_fingerprint: str
    clip_fingerprint: str
    num_codes: int
    grid_size: tuple[int, int]  # (h, w) of each sample's codes
    image_size: int
    embed_dim: int  # E
    codes_dtype: str
    embedding_dtype: str
    shard_size: int  # positions of the split's order per shard
    batch_size: int  # images per tokenizer/CLIP pass (it can change the last bits of a result)
    data: dict[str, Any]  # the data settings that decide which samples come in which order
    tokens: bool = False  # the shards hold CLIP token features (absent from older plans)
    word_embeddings: bool = False  # text token features hold word embeddings too (absent: no)
    text_token_shape: tuple[int, int] | None = None  # (L, W), None without token features
    image_token_shape: tuple[int, int] | None = None  # (Np, W'), None without token features

    def __post_init__(self) -> None:
        """uint16 would wrap the codes of a codebook over 65,536 entries without a sound; token
        features come with both their shapes."""
        shapes = (self.text_token_shape, self.image_token_shape)
        if [shape is not None for shape in shapes] != [self.tokens] * 2:
            raise ValueError(
                f"encoding plan: tokens={self.tokens} with text_token_shape={shapes[0]} and "
                f"image_token_shape={shapes[1]}: run scripts/encode.py with overwrite=true."
            )
        if self.word_embeddings and not self.tokens:
            raise ValueError(
                "encoding plan: word_embeddings=true belongs to the token features: run "
                "scripts/encode.py with tokens=true word_embeddings=true."
            )
        dtype, num_codes = self.codes_dtype, self.num_codes
        if dtype not in CODES_DTYPES or np.iinfo(dtype).max < num_codes - 1:
            raise ValueError(
                f"encoding plan: codes_dtype={dtype!r} cannot hold {num_codes} codes; it must be "
                f"{codes_dtype(num_codes)!r}: run scripts/encode.py with overwrite=true."
            )


@dataclass
class ShardRecord:
    file: str  # relative to RUN/encoded
    num_samples: int
    num_captioned: int


@dataclass
class SplitRecord:
    name: str
    num_samples: int
    num_captioned: int
    shards: tuple[ShardRecord, ...]


@dataclass
class Manifest:
    plan: EncodingPlan
    splits: tuple[SplitRecord, ...]
    format_version: int = FORMAT_VERSION

    def split(self, name: str) -> SplitRecord:
        for record in self.splits:
            if record.name == name:
                return record
        raise ValueError(
            f"the encoded shards have no {name!r} split (they have "
            f"{[r.name for r in self.splits]}): run scripts/encode.py with splits=[...,{name}]."
        )


def write_json(path: Path, record: Any) -> Path:
    return atomic_write_text(path, json.dumps(config_to_dict(record), indent=2) + "\n")


def read_json(cls: type, path: Path) -> Any:
    """A plan, split record or manifest written by `write_json`."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}): delete RUN/encoded and run scripts/encode.py."
        ) from None
    version = values.get("format_version", FORMAT_VERSION) if isinstance(values, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version!r}; this code reads version {FORMAT_VERSION}: "
            "run scripts/encode.py with overwrite=true."
        )
    return dataclass_from_dict(cls, values, where=str(path))


def read_manifest(encoded_dir: str | Path) -> Manifest:
    path = Path(encoded_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_FILE} in {encoded_dir}: the shards are missing or their encode did not "
            "finish; run scripts/encode.py run_dir=RUN (it resumes where it stopped)."
        )
    return read_json(Manifest, path)
