"""A convolutional stem for the small CLIP's vision tower, in place of its patch embedding.

A ViT cuts the image into P x P patches and embeds each with one linear map, so a shape that
straddles two patches reaches the transformer as two unrelated halves. The stem instead runs
stride-2 3x3 convolutions (channels doubling from `channels`) until the image is the patch grid,
then a 1x1 convolution to the transformer's width: the same tokens, each also seeing up to
P - 1 pixels past the top and left of its patch. On the shapes, where a small shape is one patch
wide, it lifts CLIP's shape-swap probe (Xiao et al., "Early Convolutions Help Transformers See
Better", https://arxiv.org/abs/2106.14881).
"""

from __future__ import annotations

import torch
from torch import nn


class ConvStem(nn.Module):
    """(B, 3, H, W) images -> (B, width, H / patch_size, W / patch_size), like the patch embedding
    it replaces (open_clip's `visual.conv1`, whose `out_channels` it also names)."""

    def __init__(self, channels: int, width: int, patch_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels, out_channels, scale = 3, channels, patch_size
        while scale > 1:
            layers += [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), nn.GELU()]
            in_channels, out_channels, scale = out_channels, out_channels * 2, scale // 2
        layers.append(nn.Conv2d(in_channels, width, 1))
        self.layers = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)
