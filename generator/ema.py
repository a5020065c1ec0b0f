"""An exponential moving average of a model's weights, the weights a generator is exported with.

The average is a full copy of the model, a submodule of the LightningModule, so it is saved in
every checkpoint and a resumed run continues the same average. Its decay warms up as
`min(decay, (1 + step) / (10 + step))`: early on, the average would otherwise be dominated by
the random initial weights for thousands of steps, longer than a short run lasts.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(step: int, decay: float) -> float:
    return min(decay, (1 + step) / (10 + step))


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(
                f"ema_decay must be in (0, 1), or 0 for no EMA, got {decay}; 0.999 is usual."
            )
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards `model`'s weights after optimiser step `step`."""
        weight = 1 - ema_decay_at(step, self.decay)
        for average, current in zip(self.model.parameters(), model.parameters(), strict=True):
            average.lerp_(current.detach(), weight)
        for average, current in zip(self.model.buffers(), model.buffers(), strict=True):
            average.copy_(current)
