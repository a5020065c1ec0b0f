"""PatchGAN discriminator: one real/fake logit per overlapping image patch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenizer.vqgan import group_norm


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3
    base_channels: int = 64
    num_layers: int = 3  # stride-2 layers; the receptive field grows with each

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"discriminator.num_layers must be at least 1, got {self.num_layers}.")


class PatchDiscriminator(nn.Module):
    """(B, 3, H, W) images -> (B, 1, H', W') patch logits.

    GroupNorm rather than BatchNorm, so a patch's score does not depend on the rest of the
    batch and data-parallel replicas need no synchronised statistics.
    """

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        width = config.base_channels
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        for index in range(1, config.num_layers + 1):
            stride = 2 if index < config.num_layers else 1
            out_width = config.base_channels * min(2**index, 8)
            layers += [
                nn.Conv2d(width, out_width, 4, stride=stride, padding=1, bias=False),
                group_norm(out_width),
                nn.LeakyReLU(0.2),
            ]
            width = out_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
