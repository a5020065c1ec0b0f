"""What several test files share: running a script, small run directories and their parts, tiny
configs and models, and hand-made inputs. Test files import from here, never from each other;
conftest.py holds the fixtures built on these."""

import hashlib
import importlib.util
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.trainer.connectors.data_connector import (
    _get_distributed_sampler,
    _is_dataloader_shuffled,
    _update_dataloader,
)
from lightning.pytorch.trainer.states import RunningStage
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from generator.clip import (
    CLIPConfig,
    ImageTokens,
    TextTokens,
    build_small_clip,
    load_clip,
    save_trained_clip,
)
from generator.conditioning import ConditionConfig
from generator.data import EncodedSample
from generator.encoding import encode_run
from generator.export import Provenance, save_generator
from generator.gpt import GPT, GPTConfig
from generator.module import GeneratorModule
from generator.shards import tokenizer_fingerprint
from tokenizer import VQGAN, VQGANConfig
from tokenizer.base.optim import OptimConfig
from tokenizer.data import DataConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# ---------------------------------------------------------------------------------------------
# What some tests need from the machine


def unavailable(reason: str, install: str) -> None:
    """Skip a test whose tool is missing on a user's machine; fail it under CI (`CI` set, as
    .ci/run does after installing every such tool), where no test may skip."""
    if os.environ.get("CI"):
        pytest.fail(f"CI runs every test, but {reason} ({install}).")
    pytest.skip(f"{reason}: {install}")


# ---------------------------------------------------------------------------------------------
# Scripts and configs

TINY = [  # scripts/train_tokenizer.py at test size
    "tokenizer=tiny",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.num_val=16",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
]


BLOCKING = (  # runs the script after it, with the packages named in BLOCKED unimportable
    "import os, runpy, sys\n"
    "for name in os.environ['BLOCKED'].split(): sys.modules[name] = None\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run_script(
    name: str,
    *overrides: str | bytes,
    timeout: float = 300,
    check: bool = False,
    blocked: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """scripts/<name> in a fresh Python, from the repository root; `check` asserts it exited
    with status 0, showing the end of its stderr if not. Importing a `blocked` package fails."""
    command = [sys.executable, str(ROOT / "scripts" / name), *overrides]
    env = None
    if blocked:
        command[1:1] = ["-c", BLOCKING]
        env = {**os.environ, "BLOCKED": " ".join(blocked)}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def load_script(name: str) -> ModuleType:
    """scripts/<name> as a module, to call the plain function its @hydra.main wraps in this
    process (with a config from compose_config): no new Python, no Hydra output folder."""
    path = ROOT / "scripts" / name
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """conf/<config_name>.yaml with `overrides`, as Hydra composes it for a script."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def read_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# Run directories and their parts


class FakeCLIP:
    """Follows generator.clip.CLIPEncoder's interface: fixed random projections of pooled
    pixels and of a caption's byte histogram, l2-normalised. Its text tokens are a start token,
    one per word (a word's byte sum) and an end token, at most 16; its image tokens a 4 x 4 grid
    of average colours, projected."""

    embed_dim = 16
    text_token_shape = (16, 8)  # (L, W)
    image_token_shape = (16, 6)  # (Np, W')

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.image_projection = torch.randn(3 * 4 * 4, self.embed_dim, generator=generator)
        self.text_projection = torch.randn(256, self.embed_dim, generator=generator)
        length, width = self.text_token_shape
        self.word_table = torch.randn(258, width, generator=generator)  # bytes, start, end
        self.position_table = torch.randn(length, width, generator=generator)
        self.patch_projection = torch.randn(3, self.image_token_shape[1], generator=generator)

    def token_ids(self, caption: str) -> list[int]:
        words = [sum(word.encode()) % 256 for word in caption.split()]
        return [256, *words][: self.text_token_shape[0] - 1] + [257]

    def encode_text_tokens(
        self, captions: list[str], batch_size: int = 256, word_embeddings: bool = False
    ) -> TextTokens:
        """Word plus position per token; with word_embeddings, its negation beside it."""
        length, width = self.text_token_shape
        features = torch.zeros(len(captions), length, width)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for row, caption in enumerate(captions):
            ids = self.token_ids(caption)
            features[row, : len(ids)] = self.word_table[ids] + self.position_table[: len(ids)]
            mask[row, : len(ids)] = True
        if word_embeddings:
            features = torch.cat([features, -features], dim=-1)
        return TextTokens(self.encode_text(captions), features, mask)

    def encode_image_tokens(self, images: torch.Tensor, batch_size: int = 256) -> ImageTokens:
        patches = F.adaptive_avg_pool2d(images, 4).flatten(2).transpose(1, 2)  # (B, 16, 3)
        return ImageTokens(self.encode_image(images), patches @ self.patch_projection)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(images, 4).flatten(1)  # (B, 48)
        return F.normalize(pooled @ self.image_projection, dim=-1)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        counts = torch.zeros(len(captions), 256)
        for row, caption in enumerate(captions):
            for byte in caption.encode():
                counts[row, byte] += 1
        return F.normalize(counts @ self.text_projection, dim=-1)

    def fingerprint(self) -> str:
        tables = [self.image_projection, self.text_projection, self.word_table]
        tables += [self.position_table, self.patch_projection]
        weights = torch.cat([table.flatten() for table in tables])
        return hashlib.sha256(weights.numpy().tobytes()).hexdigest()


def shapes_config(**overrides) -> DataConfig:
    values = dict(num_train=10, num_val=3, batch_size=4, num_workers=0)
    return DataConfig(source="shapes", **{**values, **overrides})


def save_tokenizer(run_dir: Path, seed: int = 0) -> VQGAN:
    """RUN/tokenizer: the tiny VQGAN (an 8x8 grid of 64 codes), randomly initialised."""
    torch.manual_seed(seed)
    vqgan = VQGAN(VQGANConfig.tiny()).eval()
    vqgan.save_pretrained(run_dir / "tokenizer")
    return vqgan


def save_small_clip(directory: Path, **fields) -> CLIPConfig:
    """A small trained-source CLIP at test size (TINY_SMALL with `fields` changed), randomly
    initialised from seed 0 and written into `directory` as train_clip.py writes RUN/clip."""
    config = CLIPConfig(source="trained", **{**TINY_SMALL, **fields})
    torch.manual_seed(0)
    save_trained_clip(build_small_clip(config), config, directory)
    return config


def save_clip(run_dir: Path, seed: int = 0) -> None:
    """RUN/clip: conf/clip/tiny.yaml's CLIP, randomly initialised."""
    config = instantiate(OmegaConf.load(CONF / "clip" / "tiny.yaml"), _convert_="all")
    torch.manual_seed(seed)
    save_trained_clip(build_small_clip(config), config, run_dir / "clip")


def save_random_generator(run_dir: Path, provenance: Provenance | None = None) -> GPT:
    """A randomly initialised tiny GPT for the run's tokenizer and CLIP (no training needed)."""
    vqgan = VQGAN.from_pretrained(run_dir / "tokenizer")
    clip = load_clip(CLIPConfig(source="trained"), run_dir)
    config = GPTConfig.preset(
        "tiny",
        vocab_size=vqgan.num_codes,
        grid_size=vqgan.config.grid_size,
        clip_dim=clip.embed_dim,
    )
    torch.manual_seed(0)
    model = GPT(config)
    if provenance is None:
        fingerprint = tokenizer_fingerprint(run_dir / "tokenizer")
        provenance = Provenance(fingerprint, clip.fingerprint(), "text")
    save_generator(model, provenance, run_dir / "generator")
    return model


def make_encoded_run(run_dir: Path, num_train: int = 16, num_val: int = 4) -> Path:
    """RUN/tokenizer (the tiny VQGAN: an 8x8 grid of 64 codes) and RUN/encoded, whose
    embeddings come from FakeCLIP (16 wide)."""
    save_tokenizer(run_dir)
    config = shapes_config(num_train=num_train, num_val=num_val)
    encode_run(run_dir, config, FakeCLIP(), shard_size=8)
    return run_dir


def encoded_files(run_dir: Path) -> dict[str, bytes]:
    root = run_dir / "encoded"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# A tiny generator, trained on one fixed batch

VOCAB, GRID, CLIP_DIM = 64, (8, 8), FakeCLIP.embed_dim


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig.preset(
        "tiny", vocab_size=VOCAB, grid_size=GRID, clip_dim=CLIP_DIM, **overrides
    )


def tiny_module(ema_decay: float = 0.0) -> GeneratorModule:
    torch.manual_seed(0)
    return GeneratorModule.from_configs(
        tiny_config(p_uncond=0.0),
        OptimConfig(lr=3e-3, betas=(0.9, 0.95), warmup_steps=0),
        ConditionConfig(mode="text"),
        ema_decay=ema_decay,
    )


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(
        torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1
    )


def fixed_batch_loader(size: int = 8) -> DataLoader:
    """One batch of eight fixed samples, seen again at every step."""
    torch.manual_seed(0)
    samples = [
        EncodedSample(
            codes=torch.randint(0, VOCAB, (64,)),
            image_embedding=embedding,
            text_embedding=embedding,
            has_text=torch.tensor(True),
            caption=f"sample {index}",
        )
        for index, embedding in enumerate(unit(size, CLIP_DIM, seed=3))
    ]
    return DataLoader(samples * 40, batch_size=size)


# ---------------------------------------------------------------------------------------------
# A tiny CLIP

TINY_SMALL = {  # the small CLIP trained in tests, at test size
    "embed_dim": 16,
    "patch_size": 8,
    "vision_width": 16,
    "vision_layers": 1,
    "vision_heads": 2,
    "vision_pos_embed": "learnable",  # the tiny preset covers sin_cos_2d
    "text_width": 16,
    "text_layers": 1,
    "text_heads": 2,
    "context_length": 24,
}


# ---------------------------------------------------------------------------------------------
# Images, image files and loaders


def random_images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=generator) * 2 - 1  # (B, 3, H, W)


def image_bytes(array: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def write_images(root: Path) -> list[tuple[str, bytes, str]]:
    """Eleven small images (one of them corrupt, two without captions) under `root`."""
    rng = np.random.default_rng(0)
    files = []
    for index in range(11):
        array = rng.integers(0, 256, (30 + index, 40, 3), dtype=np.uint8)
        data = b"not an image" if index == 4 else image_bytes(array, "PNG")
        caption = "" if index in (2, 7) else f"picture {index}"
        files.append((f"image{index:02d}", data, caption))
    root.mkdir(parents=True)
    for key, data, caption in files:
        (root / f"{key}.png").write_bytes(data)
        if caption:
            (root / f"{key}.txt").write_text(caption)
    return files


def hand_made_png(
    width: int, height: int, bit_depth: int, colour_type: int, pixels: bytes
) -> bytes:
    """A PNG written by hand: its header says what we like, whatever the (compressed) pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def huge_header_png() -> bytes:
    """65 bytes whose header claims 20,000 x 20,000 RGB pixels (1.2 GB decoded)."""
    return hand_made_png(20_000, 20_000, 8, 2, zlib.compress(b""))


def decompression_bomb_png(side: int = 12_000) -> bytes:
    """A real, complete 1-bit PNG of side**2 black pixels in 18 kB: 1.44e8 pixels, just
    over the default limit (1 << 27), where Pillow only warns unless told otherwise."""
    compressor = zlib.compressobj(9)
    row = b"\x00" + bytes((side + 7) // 8)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return hand_made_png(side, side, 1, 0, pixels)


def lightning_rank_loaders(loader: DataLoader, world_size: int) -> list[DataLoader]:
    """The training `loader` as Lightning remakes it on each DDP rank: with the distributed
    sampler it injects in place of the loader's own (Trainer(use_distributed_sampler=True))."""
    shuffle = _is_dataloader_shuffled(loader)
    loaders = []
    for rank in range(world_size):
        sampler = _get_distributed_sampler(
            loader, shuffle, overfit_batches=0, num_replicas=world_size, rank=rank
        )
        loaders.append(_update_dataloader(loader, sampler, mode=RunningStage.TRAINING))
    return loaders
