"""Optimiser settings and the warm-up + cosine schedule, shared by every training stage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max gradient norm; 0 = off

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}.")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class OptimizerWithSchedule(NamedTuple):
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def as_lightning(self) -> dict:
        """The form Lightning's `configure_optimizers` returns: a scheduler stepped per step."""
        return {
            "optimizer": self.optimizer,
            "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"},
        }


def adamw_with_schedule(
    parameters, config: OptimConfig, total_steps: int, lr: float | None = None
) -> OptimizerWithSchedule:
    """AdamW and its per-step warm-up + cosine scheduler."""
    optimizer = torch.optim.AdamW(
        parameters, lr=lr or config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, config.warmup_steps, total_steps, config.min_lr_ratio),
    )
    return OptimizerWithSchedule(optimizer, scheduler)


UNBOUNDED_STEPS = 100_000  # the schedule's length when the trainer sets no max_steps


def schedule_length(max_steps: int) -> int:
    """Steps the cosine runs over: the trainer's max_steps, or UNBOUNDED_STEPS without one."""
    return max_steps if max_steps > 0 else UNBOUNDED_STEPS


class ClipsGradientNorm:
    """LightningModule mixin: clip the gradient norm to `self.optim_config.grad_clip` (0 = off)
    whenever Lightning steps an optimizer, so the trainer config need not repeat it."""

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        if self.optim_config.grad_clip > 0:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.optim_config.grad_clip,
                gradient_clip_algorithm="norm",
            )
