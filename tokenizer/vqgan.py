"""VQ-GAN: a convolutional encoder, a vector-quantized bottleneck and a convolutional decoder.

`encode(images) -> codes (B, h, w)` and `decode(codes) -> images` are the inference API;
`forward` is the training pass. Inference weights export to safetensors plus a JSON config,
and load back without unpickling anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from tokenizer.base.configs import checked_config, load_config, save_config
from tokenizer.base.run_dir import CONFIG_FILE, WEIGHTS_FILE
from tokenizer.base.weights import load_checked_model, save_weights
from tokenizer.quantizer import QuantizerConfig, VectorQuantizer

CONFIG_KIND = "vqgan"


@checked_config("tokenizer.model")
@dataclass
class VQGANConfig:
    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)  # one level per entry; f = 2^(levels-1)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)  # feature-map sides (pixels) that get attention
    middle_attention: bool = True  # attention between the middle ResNet blocks, as in VQGAN
    latent_dim: int = 64
    dropout: float = 0.0
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self) -> None:
        if not self.channel_multipliers:
            raise ValueError("tokenizer.model.channel_multipliers needs at least one level.")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"tokenizer.model.image_size={self.image_size} is not divisible by the "
                f"down-sampling factor {self.downsample_factor} (from channel_multipliers="
                f"{list(self.channel_multipliers)}); choose a multiple of {self.downsample_factor}."
            )

    @classmethod
    def tiny(cls, **overrides) -> VQGANConfig:
        """A few-thousand-parameter f4 model at 32 px, for tests."""
        values = dict(
            image_size=32,
            base_channels=16,
            channel_multipliers=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(8,),
            latent_dim=16,
            quantizer=QuantizerConfig(num_codes=64, code_dim=4, dead_code_steps=0),
        )
        return cls(**{**values, **overrides})

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.image_size // self.downsample_factor
        return side, side

    @classmethod
    def load(cls, directory: str | Path) -> VQGANConfig:
        """The config of the tokenizer exported into `directory`, read without its weights."""
        return load_config(cls, Path(directory) / CONFIG_FILE, kind=CONFIG_KIND)


def group_norm(channels: int) -> nn.GroupNorm:
    """32 groups where there are channels enough, and never fewer than 4 channels a group:
    one channel a group is instance norm, which erases each image's flat colours."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4)), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        qkv = rearrange(self.qkv(self.norm(x)), "b (n c) h w -> n b 1 (h w) c", n=3)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, 1, HW, C)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: exact halving


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level_blocks(
    in_channels: int, out_channels: int, count: int, attention: bool, dropout: float
) -> nn.ModuleList:
    """`count` ResNet blocks at one resolution, each followed by attention where asked."""
    blocks = nn.ModuleList()
    for i in range(count):
        blocks.append(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout))
        if attention:
            blocks.append(AttentionBlock(out_channels))
    return blocks


def middle_blocks(channels: int, dropout: float, attention: bool) -> nn.Sequential:
    return nn.Sequential(
        ResnetBlock(channels, channels, dropout),
        AttentionBlock(channels) if attention else nn.Identity(),
        ResnetBlock(channels, channels, dropout),
    )


class Encoder(nn.Module):
    """(B, 3, H, W) images -> (B, latent_dim, H/f, W/f) latents."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers]
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        resolution, in_width = config.image_size, widths[0]
        for index, width in enumerate(widths):
            attention = resolution in config.attention_resolutions
            level = nn.Module()
            level.blocks = level_blocks(
                in_width, width, config.num_res_blocks, attention, config.dropout
            )
            is_last = index == len(widths) - 1
            level.downsample = nn.Identity() if is_last else Downsample(width)
            self.levels.append(level)
            in_width = width
            resolution = resolution if is_last else resolution // 2
        self.middle = middle_blocks(widths[-1], config.dropout, config.middle_attention)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.latent_dim, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            h = level.downsample(h)
        h = self.middle(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, latent_dim, h, w) latents -> (B, 3, h*f, w*f) images (unbounded; ~[-1, 1])."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers]
        self.conv_in = nn.Conv2d(config.latent_dim, widths[-1], 3, padding=1)
        self.middle = middle_blocks(widths[-1], config.dropout, config.middle_attention)
        self.levels = nn.ModuleList()
        resolution, in_width = config.image_size // config.downsample_factor, widths[-1]
        for index, width in reversed(list(enumerate(widths))):
            attention = resolution in config.attention_resolutions
            level = nn.Module()
            level.blocks = level_blocks(
                in_width, width, config.num_res_blocks + 1, attention, config.dropout
            )
            level.upsample = nn.Identity() if index == 0 else Upsample(width)
            self.levels.append(level)
            in_width = width
            resolution = resolution if index == 0 else resolution * 2
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.in_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight is measured at."""
        return self.conv_out.weight

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.middle(self.conv_in(latents))
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANOutput(NamedTuple):
    reconstructions: torch.Tensor  # (B, 3, H, W), not clamped
    codes: torch.Tensor  # (B, h, w)
    quantizer_loss: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(config.quantizer, config.latent_dim)
        self.decoder = Decoder(config)

    @property
    def num_codes(self) -> int:
        return self.config.quantizer.num_codes

    def forward(self, images: torch.Tensor) -> VQGANOutput:
        self._check_images(images)
        quantized = self.quantizer(self.encoder(images))
        reconstructions = self.decoder(quantized.quantized)
        return VQGANOutput(
            reconstructions,
            quantized.codes,
            quantized.loss,
            quantized.commitment_loss,
            quantized.codebook_loss,
        )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, h, w) long codes."""
        self._check_images(images)
        latents = self.encoder(images)
        vectors = self.quantizer.to_lookup_space(latents)
        codes = self.quantizer.nearest_codes(vectors)
        b, _, h, w = latents.shape
        return rearrange(codes, "(b h w) -> b h w", b=b, h=h, w=w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, 3, H, W) images in [-1, 1]."""
        if codes.dim() != 3:
            raise ValueError(f"decode expects codes of shape (B, h, w), got {tuple(codes.shape)}.")
        latents = self.quantizer.embed_codes(codes.long())
        return self.decoder(latents.to(self.decoder.conv_in.weight.dtype)).clamp(-1.0, 1.0)

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        expected = (self.config.in_channels, size, size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, expected))}), got "
                f"{tuple(images.shape)}; resize them to the tokenizer's image_size={size}."
            )

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `model.safetensors` and `config.json` into `directory`, each atomically."""
        directory = Path(directory)
        save_weights(self, directory / WEIGHTS_FILE)
        save_config(self.config, directory / CONFIG_FILE, kind=CONFIG_KIND)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> VQGAN:
        """Load an exported tokenizer; reads JSON and safetensors only, never a pickle."""
        directory = Path(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(
                f"No tokenizer weights at {weights}: train one with scripts/train_tokenizer.py "
                f"or point to the folder that holds {WEIGHTS_FILE} and {CONFIG_FILE}."
            )
        config = VQGANConfig.load(directory)
        fix = "re-export the tokenizer with scripts/train_tokenizer.py."
        model = load_checked_model(lambda: cls(config), weights, directory / CONFIG_FILE, fix)
        return model.to(device).eval()
