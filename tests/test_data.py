"""Datasets: shapes, image folders and WebDataset shards behind one Sample interface."""

import csv
import io
import json
import logging
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import decompression_bomb_png, hand_made_png, huge_header_png, lightning_rank_loaders
from PIL import Image

from generator.clip.data import CaptionBatch, CaptionDataModule
from tokenizer.data import (
    SHARD_IMAGE_KEYS,
    DataConfig,
    RankSplit,
    ReportingDataLoader,
    Sample,
    ShapesDataset,
    build_dataset,
)
from tokenizer.data.datamodule import ImageDataModule
from tokenizer.shapes import ShapesConfig, check, parse_caption, scene_matches


def _encoded_image(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _encoded(array: np.ndarray, format: str) -> bytes:
    return _encoded_image(Image.fromarray(array), format)


def _png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG, written by hand because Pillow cannot write one."""
    height, width, _ = array.shape
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    return hand_made_png(width, height, 16, 2, zlib.compress(rows))


@pytest.fixture
def captioned_files() -> dict[str, tuple[bytes, str]]:
    """Relative path -> (file bytes, caption): a few small images in two formats."""
    rng = np.random.default_rng(0)
    files = {}
    for index in range(5):
        array = rng.integers(0, 256, (24 + 4 * index, 40, 3), dtype=np.uint8)
        name = f"group{index % 2}/image{index}." + ("png" if index % 2 else "jpg")
        files[name] = (_encoded(array, "PNG" if index % 2 else "JPEG"), f"caption number {index}")
    return files


def _write_folder(root: Path, files: dict[str, tuple[bytes, str]], captions: str) -> None:
    """The files under root, captioned by "sidecars", "jsonl" or "csv"."""
    for name, (data, caption) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if captions == "sidecars":
            path.with_suffix(".txt").write_text(caption)
    if captions == "jsonl":
        lines = [json.dumps({"path": name, "caption": c}) for name, (_, c) in files.items()]
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    if captions == "csv":
        with open(root / "captions.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["file_name", "text"])
            writer.writerows([name, caption] for name, (_, caption) in files.items())


def _write_shards(root: Path, files: dict[str, tuple[bytes, str]], per_shard: int) -> None:
    root.mkdir(parents=True)
    names = sorted(files)
    for shard, start in enumerate(range(0, len(names), per_shard)):
        with wds.TarWriter(str(root / f"part-{shard:03d}.tar")) as writer:
            for name in names[start : start + per_shard]:
                data, caption = files[name]
                key, extension = name.rsplit(".", 1)
                writer.write({"__key__": key, extension: data, "txt": caption})


def _pairs(dataset) -> dict[str, torch.Tensor]:
    """caption -> image, over one pass of a dataset."""
    return {sample.caption: sample.image for sample in dataset}


def _config(source: str, path: Path, **overrides) -> DataConfig:
    return DataConfig(source=source, path=str(path), val_fraction=0.0, num_workers=0, **overrides)


def test_sidecars_captions_file_and_shards_yield_the_same_pairs(tmp_path, captioned_files):
    for captions in ("sidecars", "jsonl", "csv"):
        _write_folder(tmp_path / captions, captioned_files, captions)
    _write_shards(tmp_path / "shards", captioned_files, per_shard=2)
    sources = [("folder", tmp_path / name) for name in ("sidecars", "jsonl", "csv")]
    sources.append(("webdataset", tmp_path / "shards"))
    first, *others = [_pairs(build_dataset(_config(*source), "train")) for source in sources]
    assert sorted(first) == sorted(c for _, c in captioned_files.values())
    for caption, image in first.items():
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        assert all(torch.equal(image, other[caption]) for other in others)
    assert all(sorted(other) == sorted(first) for other in others)


class BadInputs(NamedTuple):
    files: dict[str, bytes]  # name -> file bytes
    good: dict[str, tuple[int, int, int]]  # name -> the RGB the file should read as
    bad: list[str]  # names that must be skipped


def _bad_inputs() -> BadInputs:
    """Exotic modes that must convert, and broken, hostile or mislabelled files to skip."""
    files, good = {}, {}

    def add(name: str, data: bytes, rgb: tuple[int, int, int] | None = None) -> None:
        files[name] = data
        if rgb is not None:
            good[name] = rgb

    add("plain.png", _encoded(np.full((20, 30, 3), (10, 200, 30), np.uint8), "PNG"), (10, 200, 30))
    cmyk = Image.new("CMYK", (30, 30), (255, 0, 0, 0))  # full cyan
    add("cmyk.jpg", _encoded_image(cmyk, "JPEG"), (0, 255, 255))
    add("grey16.png", _encoded(np.full((30, 30), 65535, np.uint16), "PNG"), (255, 255, 255))
    add("rgb16.png", _png16_rgb(np.full((30, 30, 3), (65535, 0, 32896))), (255, 0, 128))
    rgba = np.zeros((30, 30, 4), np.uint8)  # red, fully transparent: the white background shows
    rgba[..., 0] = 255
    add("rgba.png", _encoded(rgba, "PNG"), (255, 255, 255))
    palette = Image.new("P", (1, 1), 3).convert("RGB").getpixel((0, 0))
    add("palette.gif", _encoded_image(Image.new("P", (30, 30), 3), "GIF"), palette)
    transparent = Image.new("P", (30, 30), 0)
    transparent.putpalette([255, 0, 0] * 256)  # red, but index 0 is transparent
    add("palette_alpha.png", _encoded_image(transparent, "PNG", transparency=0), (255,) * 3)
    grey_alpha = np.stack([np.zeros((30, 30), np.uint8), np.full((30, 30), 128, np.uint8)], -1)
    add("grey_alpha.png", _encoded_image(Image.fromarray(grey_alpha, "LA"), "PNG"), (127,) * 3)
    add("bilevel.png", _encoded_image(Image.new("1", (30, 30), 0), "PNG"), (0, 0, 0))
    floats = Image.fromarray(np.full((30, 30), 0.5, np.float32))
    add("float_tiff_named.png", _encoded_image(floats, "TIFF"), (127, 127, 127))
    add("png_named.jpg", _encoded(np.full((30, 30, 3), (5, 6, 250), np.uint8), "PNG"), (5, 6, 250))
    huge = _encoded_image(Image.new("RGB", (3000, 2000), (90, 60, 30)), "JPEG", quality=95)
    add("huge.jpg", huge, (90, 60, 30))
    jpeg = _encoded(np.full((64, 64, 3), 128, np.uint8), "JPEG")
    add("truncated.jpg", jpeg[: len(jpeg) // 2])
    add("empty.jpg", b"")
    add("text.png", b"this is not an image")
    add("huge_header.png", huge_header_png())
    add("bomb.png", decompression_bomb_png())
    return BadInputs(files, good, sorted(set(files) - set(good)))


def _seed_bad_folder(root: Path) -> tuple[dict[str, tuple[int, int, int]], list[str]]:
    """The bad inputs under root, each with a sidecar caption equal to its name; returns the
    good files (name -> RGB) and the bad file names."""
    inputs = _bad_inputs()
    root.mkdir()
    for name, data in inputs.files.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(name)
    return inputs.good, inputs.bad


def _seed_bad_shards(root: Path) -> tuple[dict[str, tuple[int, int, int]], list[str]]:
    """The bad inputs whose extension is a WebDataset image key, in shards, captioned by name."""
    inputs = _bad_inputs()
    files = {n: (d, n) for n, d in inputs.files.items() if n.rsplit(".", 1)[1] in SHARD_IMAGE_KEYS}
    _write_shards(root, files, per_shard=5)
    return {n: inputs.good[n] for n in files if n in inputs.good}, inputs.bad


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("source", ["folder", "webdataset"])
def test_bad_files_are_skipped_counted_and_reported(tmp_path, caplog, monkeypatch, source, workers):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the config's limit must hold anyway
    seed = _seed_bad_folder if source == "folder" else _seed_bad_shards
    good, bad = seed(tmp_path / "mixed")
    dataset = build_dataset(_config(source, tmp_path / "mixed"), "train")
    loader = ReportingDataLoader(dataset, batch_size=4, num_workers=workers)
    seen: dict[str, torch.Tensor] = {}
    with caplog.at_level(logging.WARNING, logger="tokenizer.data"):
        for batch in loader:
            assert isinstance(batch, Sample) and batch.image.shape[1:] == (3, 32, 32)
            seen.update(zip(batch.caption, batch.image, strict=True))
    assert set(seen) == set(good)
    for name, rgb in good.items():
        expected = torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(seen[name][:, 16, 16], expected, atol=0.05), name
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in dataset.skip_log.last_report}
    assert sorted(name.split(":")[-1] for name in reasons) == sorted(bad)
    assert all("DecompressionBomb" in reasons[n] for n in reasons if "bomb" in n or "huge" in n)
    reports = [r for r in caplog.records if f"skipped {len(bad)} unreadable" in r.getMessage()]
    assert len(reports) == 1 and all(name in reports[0].getMessage() for name in bad)


def test_images_over_the_pixel_limit_are_skipped(tmp_path):
    good, _ = _seed_bad_folder(tmp_path / "mixed")
    config = _config("folder", tmp_path / "mixed", max_image_pixels=1_000_000)
    dataset = build_dataset(config, "train")
    for _ in ReportingDataLoader(dataset, batch_size=16):
        pass
    reasons = {Path(s.path).name: s.reason for s in dataset.skip_log.last_report}
    assert "DecompressionBomb" in reasons["huge.jpg"]


def test_missing_or_empty_inputs_fail_at_start(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(_config("folder", tmp_path / "nowhere"), "train")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        build_dataset(_config("folder", tmp_path / "empty"), "train")
    with pytest.raises(FileNotFoundError, match="shards do not exist"):
        build_dataset(_config("webdataset", tmp_path / "part-{000..003}.tar"), "train")
    with pytest.raises(ValueError, match="data.path is empty"):
        DataConfig(source="folder")
    with pytest.raises(ValueError, match="random_flip"):
        DataConfig(source="shapes", random_flip=True)


def test_bad_shard_samples_are_skipped(tmp_path, captioned_files):
    broken = dict(captioned_files)
    broken["group0/broken.jpg"] = (b"not a jpeg", "broken")
    _write_shards(tmp_path / "shards", broken, per_shard=3)
    dataset = build_dataset(_config("webdataset", tmp_path / "shards"), "train")
    captions = [
        caption for batch in ReportingDataLoader(dataset, batch_size=2) for caption in batch.caption
    ]
    assert sorted(captions) == sorted(c for _, c in captioned_files.values())
    assert [s.path.rsplit(":", 1)[1] for s in dataset.skip_log.last_report] == ["group0/broken.jpg"]


def test_tar_members_that_escape_their_folder_are_skipped_and_never_written(tmp_path, monkeypatch):
    outside, work = tmp_path / "outside", tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where "../evil.png" would land if anything extracted it
    image = _encoded(np.full((32, 32, 3), 200, np.uint8), "PNG")
    members = {
        "good.png": image,
        "good.txt": b"the good one",
        f"{outside}/evil.png": image,
        "../evil.png": image,
        "nested/../../evil.png": image,
    }
    with tarfile.open(tmp_path / "crafted.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "crafted.tar") as tar:
        assert tar.getnames() == list(members)  # the crafted names really are in the file
    dataset = build_dataset(_config("webdataset", tmp_path / "crafted.tar"), "train")
    captions = [c for batch in ReportingDataLoader(dataset, batch_size=2) for c in batch.caption]
    assert captions == ["the good one"]
    skipped = sorted(s.path for s in dataset.skip_log.last_report)
    assert skipped == sorted(["../evil.png", "nested/../../evil.png", f"{outside}/evil.png"])
    assert not outside.exists() and not (tmp_path / "evil.png").exists()


def _loader_captions(dataset, num_workers: int) -> list[str]:
    loader = ReportingDataLoader(dataset, batch_size=1, num_workers=num_workers)
    return [caption for batch in loader for caption in batch.caption]


def test_shards_are_split_between_workers_and_ranks(tmp_path, captioned_files, monkeypatch):
    _write_shards(tmp_path / "shards", captioned_files, per_shard=1)  # five shards
    config = _config("webdataset", tmp_path / "shards")
    every_caption = sorted(c for _, c in captioned_files.values())
    assert sorted(_loader_captions(build_dataset(config, "train"), 2)) == every_caption
    per_rank = [
        _loader_captions(build_dataset(config, "train", ranks=RankSplit(rank, 2)), 2)
        for rank in range(2)
    ]
    assert len(per_rank[0]) == 3 and len(per_rank[1]) == 2  # shards 0, 2, 4 and 1, 3
    assert sorted(per_rank[0] + per_rank[1]) == every_caption  # each exactly once
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert build_dataset(config, "train").ranks == RankSplit(1, 2)
    with pytest.raises(ValueError, match="5 shard.* for 8 ranks: every rank needs a shard"):
        build_dataset(config, "train", ranks=RankSplit(0, 8))


def _image_key(image: torch.Tensor) -> bytes:
    return image.numpy().tobytes()


def _distinct_captioned_folder(root: Path, count: int) -> dict[str, tuple[bytes, str]]:
    rng = np.random.default_rng(1)
    files = {
        f"image{index}.png": (
            _encoded(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "PNG"),
            f"picture {index}",
        )
        for index in range(count)
    }
    _write_folder(root, files, "sidecars")
    return files


@pytest.mark.parametrize("source", ["shapes", "folder"])
def test_map_style_sources_are_split_between_ranks_by_lightning(tmp_path, source):
    """Two ranks x two batches of 4: the epoch's 16 samples, each on one rank, once."""
    if source == "folder":
        _distinct_captioned_folder(tmp_path, 16)
        config = _config("folder", tmp_path, batch_size=4)
    else:
        config = DataConfig(num_train=16, num_val=4, batch_size=4, num_workers=0)
    data = ImageDataModule(config)
    data.setup("fit")
    dataset = data.datasets["train"]
    expected = sorted(_image_key(dataset[index].image) for index in range(len(dataset)))
    seen = []
    for loader in lightning_rank_loaders(data.train_dataloader(), world_size=2):
        assert isinstance(loader, ReportingDataLoader)  # still reports skipped files
        batches = list(loader)
        assert [len(batch.caption) for batch in batches] == [4, 4]
        seen += [_image_key(image) for batch in batches for image in batch.image]
    assert sorted(seen) == expected


def test_clip_caption_batches_are_split_between_ranks_by_lightning(tmp_path):
    files = _distinct_captioned_folder(tmp_path, 8)
    data = CaptionDataModule(_config("folder", tmp_path, batch_size=2))
    seen = []
    for loader in lightning_rank_loaders(data.train_dataloader(), world_size=2):
        batches = list(loader)
        assert len(batches) == 2 and all(isinstance(b, CaptionBatch) for b in batches)
        seen += [caption for batch in batches for caption in batch.captions]
    assert sorted(seen) == sorted(caption for _, caption in files.values())


def test_held_out_fractions_partition_a_folder(tmp_path):
    for index in range(60):
        (tmp_path / f"{index:03d}.png").write_bytes(b"")  # splitting never opens files
    config = DataConfig(source="folder", path=str(tmp_path), val_fraction=0.3, test_fraction=0.2)
    splits = {split: set(build_dataset(config, split).files) for split in ("train", "val", "test")}
    assert all(len(files) > 3 for files in splits.values())
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"])
    assert not splits["val"] & splits["test"]
    assert len(splits["train"] | splits["val"] | splits["test"]) == 60


def test_random_flip_only_in_train_and_only_when_allowed(tmp_path):
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, 16:] = 255  # black left half, white right half
    (tmp_path / "half.png").write_bytes(_encoded(half, "PNG"))

    def top_left_values(config: DataConfig, train: bool) -> set[float]:
        dataset = build_dataset(config, "train", train=train)
        return {dataset[0].image[0, 0, 0].item() for _ in range(20)}

    torch.manual_seed(0)
    flipping = _config("folder", tmp_path, random_flip=True)
    assert top_left_values(flipping, train=True) == {-1.0, 1.0}
    assert top_left_values(flipping, train=False) == {-1.0}
    assert top_left_values(_config("folder", tmp_path), train=True) == {-1.0}


def test_shapes_samples_match_their_captions():
    dataset = ShapesDataset(ShapesConfig(image_size=32), "val", length=10)
    for index in range(len(dataset)):
        image, caption = dataset[index]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        assert scene_matches(check(image), parse_caption(caption))
    assert torch.equal(
        dataset[3].image, ShapesDataset(ShapesConfig(image_size=32), "val", 10)[3].image
    )
    with pytest.raises(IndexError):
        dataset[10]


class _Probe(L.LightningModule):
    """Sums the images it sees, so the test can tell batches arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.captions: list[str] = []

    def training_step(self, batch: Sample, batch_index: int) -> torch.Tensor:
        self.captions += batch.caption
        return batch.image.mean() * self.weight

    def validation_step(self, batch: Sample, batch_index: int) -> None:
        assert batch.image.shape[1:] == (3, 32, 32)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_datamodule_trains_through_lightning_and_reports_skips(tmp_path):
    good, bad = _seed_bad_folder(tmp_path / "mixed")
    data = ImageDataModule(_config("folder", tmp_path / "mixed", batch_size=2))
    probe = _Probe()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(probe, datamodule=data)
    assert set(probe.captions) == set(good)
    assert len(data.datasets["train"].skip_log.last_report) == len(bad)

    shapes = ImageDataModule(DataConfig(num_train=8, num_val=4, batch_size=4, num_workers=0))
    shapes.setup("fit")
    batch = next(iter(shapes.train_dataloader()))
    assert batch.image.shape == (4, 3, 32, 32) and len(batch.caption) == 4
    assert len(shapes.val_dataloader()) == 1


@pytest.mark.parametrize("format", ["folder", "webdataset"])
def test_make_shapes_writes_data_that_reads_back(tmp_path, format):
    out = tmp_path / format
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_shapes.py"
    overrides = [f"out={out}", "num_images=6", f"format={format}", "image_size=32", "shard_size=4"]
    done = subprocess.run([sys.executable, str(script), *overrides], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    samples = list(build_dataset(_config(format, out), "train"))
    assert len(samples) == 6
    assert all(scene_matches(check(s.image), parse_caption(s.caption)) for s in samples)
