"""Datasets: shapes, image folders and WebDataset shards behind one Sample interface."""

import csv
import io
import json
import logging
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from tokenizer.data import (
    DataConfig,
    ImageDataModule,
    ReportingDataLoader,
    Sample,
    ShapesDataset,
    build_dataset,
)
from tokenizer.shapes import ShapesConfig, check, parse_caption, scene_matches


def _encoded(array: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def _png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG, written by hand because Pillow cannot write one."""
    height, width, _ = array.shape
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


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


def _seed_bad_folder(root: Path) -> tuple[dict[str, tuple[int, int, int]], list[str]]:
    """Good files (name -> the RGB they should read as) and bad file names, each with a
    sidecar caption equal to its name."""
    root.mkdir()
    good = {}
    (root / "plain.png").write_bytes(_encoded(np.full((20, 30, 3), (10, 200, 30), np.uint8), "PNG"))
    good["plain.png"] = (10, 200, 30)
    Image.new("CMYK", (30, 30), (255, 0, 0, 0)).save(root / "cmyk.jpg")
    good["cmyk.jpg"] = (0, 255, 255)
    Image.fromarray(np.full((30, 30), 65535, np.uint16)).save(root / "grey16.png")
    good["grey16.png"] = (255, 255, 255)
    (root / "rgb16.png").write_bytes(_png16_rgb(np.full((30, 30, 3), (65535, 0, 32896))))
    good["rgb16.png"] = (255, 0, 128)
    rgba = np.zeros((30, 30, 4), np.uint8)  # red, fully transparent: the white background shows
    rgba[..., 0] = 255
    Image.fromarray(rgba).save(root / "rgba.png")
    good["rgba.png"] = (255, 255, 255)
    Image.new("P", (30, 30), 3).save(root / "palette.gif")
    good["palette.gif"] = Image.new("P", (1, 1), 3).convert("RGB").getpixel((0, 0))
    Image.new("RGB", (3000, 2000), (90, 60, 30)).save(root / "huge.jpg", quality=95)
    good["huge.jpg"] = (90, 60, 30)
    jpeg = _encoded(np.full((64, 64, 3), 128, np.uint8), "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not an image")
    bad = ["truncated.jpg", "empty.jpg", "text.png"]
    for name in [*good, *bad]:
        (root / name).with_suffix(".txt").write_text(name)
    return good, bad


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_counted_and_reported(tmp_path, caplog, workers):
    good, bad = _seed_bad_folder(tmp_path / "mixed")
    dataset = build_dataset(_config("folder", tmp_path / "mixed"), "train")
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
    skipped = dataset.skip_log.last_report
    assert sorted(Path(s.path).name for s in skipped) == sorted(bad)
    reports = [r for r in caplog.records if "skipped 3 unreadable" in r.getMessage()]
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


def test_shards_are_split_between_workers_and_ranks(tmp_path, captioned_files, monkeypatch):
    _write_shards(tmp_path / "shards", captioned_files, per_shard=1)  # five shards
    config = _config("webdataset", tmp_path / "shards")
    dataset = build_dataset(config, "train")
    captions = [
        c
        for batch in ReportingDataLoader(dataset, batch_size=1, num_workers=2)
        for c in batch.caption
    ]
    assert sorted(captions) == sorted(c for _, c in captioned_files.values())  # each exactly once
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append({sample.caption for sample in build_dataset(config, "train")})
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(captions)


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
