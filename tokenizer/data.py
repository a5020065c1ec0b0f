"""Image datasets behind one interface: the built-in shapes, an image folder, WebDataset shards.

Every dataset yields `Sample(image, caption)` with the image as (3, H, W) float32 in [-1, 1].
`ImageDataModule` wraps them for Lightning; `build_dataset` gives one split to scripts.

Bad input never stops an epoch: a file that cannot be decoded is skipped and recorded in the
dataset's `SkipLog`, and `ReportingDataLoader` reports the epoch's skipped paths once, when
the epoch's iteration ends. The log lives in small files so DataLoader workers can share it.
"""

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.transforms import v2

from tokenizer.base.configs import checked_config
from tokenizer.shapes import SPLITS, ShapesConfig, ShapesExample, generate

logger = logging.getLogger(__name__)

SOURCES = ("shapes", "folder", "webdataset")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the img2dataset layout
CAPTION_FILES = ("captions.jsonl", "captions.csv")
PATH_COLUMNS = ("path", "file", "file_name", "image")
CAPTION_COLUMNS = ("caption", "text")
MAX_BAD_IN_A_ROW = 64  # a folder where this many files in a row fail is broken, not noisy


class RankSplit(NamedTuple):
    """This process's place among data-parallel ranks: (0, 1) without DDP or FSDP."""

    rank: int
    world_size: int


def current_rank_split() -> RankSplit:
    """The rank as torchrun and SLURM's environment or an initialised process group gives it."""
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    return RankSplit(rank, world_size)


class Sample(NamedTuple):
    image: torch.Tensor  # (3, H, W) float32 in [-1, 1]
    caption: str  # "" where there is none


@checked_config("data")
@dataclass
class DataConfig:
    """Where images come from and how they are batched. Plain types, so Hydra can fill it."""

    source: str = "shapes"  # one of SOURCES
    path: str = ""  # folder: its root; webdataset: a .tar, a folder of .tar, or "a-{000..009}.tar"
    image_size: int = 32
    batch_size: int = 64
    num_workers: int = 2
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
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("data.batch_size must be at least 1 and data.num_workers at least 0.")
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


# ---------------------------------------------------------------------------------------------
# Skipped files


class Skipped(NamedTuple):
    path: str
    reason: str


def _remove_directory(directory: str, owner: int) -> None:
    if os.getpid() == owner:  # forked workers inherit the finalizer; only the owner cleans up
        shutil.rmtree(directory, ignore_errors=True)


def _describe(error: BaseException) -> str:
    """The error's type and first message, without object reprs such as <_io.BytesIO ...>."""
    message = str(error.args[0]) if error.args else str(error)
    return f"{type(error).__name__}: {re.sub(r' ?<[^<>]*>', '', message)}".rstrip(": ")


class SkipLog:
    """Files skipped as unreadable, shared between a DataLoader's worker processes.

    Each process appends to its own file in a private temporary folder; `report` gathers them.
    """

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="skipped-images-")
        self.last_report: list[Skipped] = []
        weakref.finalize(self, _remove_directory, self.directory, os.getpid())

    def record(self, path: str, error: BaseException | str) -> None:
        reason = error if isinstance(error, str) else _describe(error)
        with open(os.path.join(self.directory, f"{os.getpid()}.jsonl"), "a") as file:
            file.write(json.dumps([path, reason]) + "\n")

    def drain(self) -> list[Skipped]:
        """Every file skipped since the last drain, once each, sorted by path."""
        found: dict[str, str] = {}
        for name in sorted(os.listdir(self.directory)):
            entry = os.path.join(self.directory, name)
            with open(entry) as file:
                for line in file:
                    path, reason = json.loads(line)
                    found.setdefault(path, reason)
            os.remove(entry)
        return [Skipped(path, found[path]) for path in sorted(found)]

    def report(self) -> list[Skipped]:
        """Log the skipped files once, keep them in `last_report`, and start a fresh count."""
        self.last_report = self.drain()
        if self.last_report:
            shown = 50
            lines = [f"  {path}: {reason}" for path, reason in self.last_report[:shown]]
            if len(self.last_report) > shown:
                lines.append(f"  ... and {len(self.last_report) - shown} more")
            logger.warning(
                "skipped %d unreadable file(s) this epoch:\n%s",
                len(self.last_report),
                "\n".join(lines),
            )
        return self.last_report


class ReportingDataLoader(DataLoader):
    """A DataLoader that reports its dataset's skipped files when an epoch's iteration ends."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        finally:
            skip_log = getattr(self.dataset, "skip_log", None)
            if skip_log is not None:
                skip_log.report()


# ---------------------------------------------------------------------------------------------
# Decoding


def _integer_grey_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) greyscale, read as 0..65535, to 8-bit 'L'."""
    values = np.asarray(image, dtype=np.float32) / 257
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))


def _float_grey_to_8bit(image: Image.Image) -> Image.Image:
    """Floating-point greyscale, in [0, 1] or else in [0, 255], to 8-bit 'L'."""
    values = np.asarray(image, dtype=np.float32)
    values = values * 255 if np.nanmax(values) <= 1 else values
    return Image.fromarray(np.clip(np.nan_to_num(values), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image, alpha_background: int = 255) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited over a grey background."""
    if image.mode.startswith("I"):
        image = _integer_grey_to_8bit(image)
    elif image.mode == "F":
        image = _float_grey_to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # palette transparency given as bytes
            rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (alpha_background,) * 3 + (255,))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(
    source: str | Path | bytes,
    max_pixels: int,
    alpha_background: int = 255,
    min_side: int | None = None,
) -> Image.Image:
    """Decode an image file (a path or its bytes) to 8-bit RGB, upright per its EXIF.

    Raises on anything unreadable: an image over `max_pixels`, a truncated or corrupt file, or
    not an image at all. With `min_side`, a JPEG is decoded at the smallest scale whose sides
    are still at least that long, which keeps very large photos cheap.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(stream) as image:
            if min_side is not None:
                image.draft(None, (min_side, min_side))
            image.load()
            upright = ImageOps.exif_transpose(image)
    return to_rgb(upright, alpha_background)


class ImageTransform:
    """Resize the shorter side to image_size, crop a square, and scale to [-1, 1].

    Train mode adds the random crop and flip the config allows. A class, not a closure, so
    that DataLoader workers started by spawn can unpickle it.
    """

    def __init__(self, config: DataConfig, train: bool) -> None:
        size = config.image_size
        crop = v2.RandomCrop(size) if train and config.random_crop else v2.CenterCrop(size)
        steps = [v2.Resize(size, antialias=True), crop]
        if train and config.random_flip:
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
        self.pipeline = v2.Compose(steps)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline(image).as_subclass(torch.Tensor) * 2 - 1  # (3, size, size)


# ---------------------------------------------------------------------------------------------
# Splits


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """The split a file belongs to, by a stable hash of its key: adding files moves no others."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < val_fraction:
        return "val"
    return "test" if u < val_fraction + test_fraction else "train"


class _Source(NamedTuple):
    path: str
    val_fraction: float  # fractions carved out of `path`; 0 where the split has its own path
    test_fraction: float
    split: str | None  # the split to keep from `path`; None keeps everything


def _source(config: DataConfig, split: str) -> _Source:
    own_path = {"val": config.val_path, "test": config.test_path}.get(split, "")
    if own_path:
        return _Source(own_path, 0.0, 0.0, None)
    val = 0.0 if config.val_path else config.val_fraction
    test = 0.0 if config.test_path else config.test_fraction
    return _Source(config.path, val, test, split)


def _shapes_length(config: DataConfig, split: str) -> int:
    return {"train": config.num_train, "val": config.num_val, "test": config.num_test}[split]


def has_split(config: DataConfig, split: str) -> bool:
    """Whether the config gives this split any data at all."""
    if config.source == "shapes":
        return _shapes_length(config, split) > 0
    if split == "train":
        return True
    own_path, fraction = {
        "val": (config.val_path, config.val_fraction),
        "test": (config.test_path, config.test_fraction),
    }[split]
    return bool(own_path) or fraction > 0


# ---------------------------------------------------------------------------------------------
# Datasets


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


def _relative_key(relative_path: str) -> str:
    return os.path.splitext(relative_path)[0]


def _read_captions_file(path: Path, root: Path) -> dict[str, str]:
    """path -> caption from a .jsonl (one object per line) or .csv (with a header) file.

    Paths are relative to the captions file's folder (or absolute); keys come back relative to
    `root` without their extension, so "a/b.jpg" in the file names the image a/b.<any ext>.
    """
    rows: list[tuple[int, dict]] = []
    with open(path, newline="", encoding="utf-8") as file:
        if path.suffix == ".csv":
            rows = list(enumerate(csv.DictReader(file), start=2))
        else:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    try:
                        rows.append((number, json.loads(line)))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}, line {number} is not JSON ({error}).") from None
    captions = {}
    for number, row in rows:
        fields = row if isinstance(row, dict) else {}
        image = next((fields[c] for c in PATH_COLUMNS if c in fields), None)
        caption = next((fields[c] for c in CAPTION_COLUMNS if c in fields), None)
        if image is None or caption is None:
            raise ValueError(
                f"{path}, line {number} needs a path ({'/'.join(PATH_COLUMNS)}) and a caption "
                f"({'/'.join(CAPTION_COLUMNS)}) field."
            )
        full = Path(image) if os.path.isabs(image) else path.parent / image
        relative = os.path.relpath(os.path.normpath(full), root)
        captions[_relative_key(Path(relative).as_posix())] = str(caption)
    return captions


class FolderDataset(Dataset):
    """Every image under a folder, recursively, with captions where there are any.

    A caption comes from a sidecar `.txt` next to the image (same name), else from a captions
    file. An unreadable file is recorded in `skip_log` and the next file stands in for it.
    """

    def __init__(self, config: DataConfig, split: str, train: bool | None = None) -> None:
        source = _source(config, split)
        self.root = Path(source.path).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist: set data.path to a folder of images."
            )
        images, sidecars = self._scan()
        if not images:
            raise ValueError(
                f"no images under {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)}): "
                "check data.path."
            )
        if source.split is not None:
            fractions = (source.val_fraction, source.test_fraction)
            images = [f for f in images if split_of(_relative_key(f), *fractions) == source.split]
        self.files = images  # paths relative to root, posix style
        self.sidecars = sidecars
        self.captions = self._captions_file(config)
        self.transform = ImageTransform(config, train=split == "train" if train is None else train)
        self.max_pixels, self.alpha_background = config.max_image_pixels, config.alpha_background
        self.image_size = config.image_size
        self.skip_log = SkipLog()

    def _scan(self) -> tuple[list[str], dict[str, str]]:
        images, sidecars = [], {}
        for directory, subdirectories, names in os.walk(self.root):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            relative = Path(directory).relative_to(self.root)
            for name in sorted(names):
                extension = os.path.splitext(name)[1].lower()
                if extension in IMAGE_EXTENSIONS:
                    images.append((relative / name).as_posix())
                elif extension == ".txt":
                    sidecar = (relative / name).as_posix()
                    sidecars[_relative_key(sidecar)] = sidecar
        return images, sidecars

    def _captions_file(self, config: DataConfig) -> dict[str, str]:
        if config.captions_file:
            path = Path(config.captions_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"captions file {path} does not exist: fix data.captions_file."
                )
            return _read_captions_file(path, self.root)
        for name in CAPTION_FILES:
            if (self.root / name).is_file():
                return _read_captions_file(self.root / name, self.root)
        return {}

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, relative_path: str) -> str:
        key = _relative_key(relative_path)
        sidecar = self.sidecars.get(key)
        if sidecar is not None:
            try:
                return (self.root / sidecar).read_text(encoding="utf-8", errors="replace").strip()
            except OSError as error:
                self.skip_log.record(str(self.root / sidecar), error)
        return self.captions.get(key, "")

    def load(self, index: int) -> Sample | None:
        """File `index` as a sample, or None (and a record in skip_log) if it cannot be read."""
        relative = self.files[index]
        path = self.root / relative
        try:
            image = load_rgb(path, self.max_pixels, self.alpha_background, self.image_size)
        except Exception as error:  # Pillow raises many types on bad data; none may stop an epoch
            self.skip_log.record(str(path), error)
            return None
        return Sample(self.transform(image), self.caption(relative))

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} images")
        for step in range(min(MAX_BAD_IN_A_ROW, len(self.files))):
            sample = self.load((index + step) % len(self.files))
            if sample is not None:
                return sample
        raise RuntimeError(
            f"{MAX_BAD_IN_A_ROW} files in a row under {self.root} could not be read (see the log "
            "of skipped files): the folder looks broken, check its contents."
        )


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
        self.source = _source(config, split)
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


def make_loader(
    dataset: Dataset, config: DataConfig, train: bool, collate_fn=None
) -> ReportingDataLoader:
    """Batches of `dataset` as the config says; shuffled and full batches only in training."""
    workers = config.num_workers
    return ReportingDataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=train and not isinstance(dataset, IterableDataset),
        drop_last=train,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_fn,
    )


def build_dataset(
    config: DataConfig, split: str, train: bool | None = None, ranks: RankSplit | None = None
) -> Dataset:
    """One split of the configured source. `train` (default: split == "train") turns on the
    random augmentations the config allows. `ranks` splits WebDataset shards (default: this
    process's rank); map-style sources are split between ranks by Lightning's sampler."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {SPLITS}.")
    if not has_split(config, split):
        raise ValueError(
            f"the data config has no {split} split: set data.num_{split}, data.{split}_path or "
            f"data.{split}_fraction."
        )
    if config.source == "shapes":
        return ShapesDataset(config.shapes_config(), split, _shapes_length(config, split))
    if config.source == "folder":
        return FolderDataset(config, split, train)
    return ShardDataset(config, split, train, ranks)


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
