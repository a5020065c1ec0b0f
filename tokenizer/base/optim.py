"""Optimiser settings and the warm-up + cosine schedule, shared by every training stage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tokenizer.base.configs import checked_config


@checked_config("optim")
@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    max_nonfinite_steps: int = 10  # stop after this many NaN or infinite losses in a row

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}.")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if self.max_nonfinite_steps < 1:
            raise ValueError(
                f"optim.max_nonfinite_steps must be at least 1, got {self.max_nonfinite_steps}."
            )


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
    whenever Lightning steps an optimizer, so the trainer config need not repeat it.

    Under FSDP each rank holds a shard of the gradient: the root FSDP module's own clip takes
    the norm over all shards (Lightning's norm clipping refuses FSDP)."""

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        # imported here: sampling loads this module without loading Lightning
        from lightning.pytorch.strategies import FSDPStrategy

        max_norm = self.optim_config.grad_clip
        if max_norm <= 0:
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.model.clip_grad_norm_(max_norm)
        else:
            self.clip_gradients(
                optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm"
            )


class NonFiniteLossError(RuntimeError):
    """Training stopped after `max_nonfinite_steps` NaN or infinite losses in a row."""


class SkipsNonFiniteLoss:
    """LightningModule mixin: a step whose loss is NaN or infinite changes nothing.

    `step_is_finite(loss)` is False for such a step: the module then skips the update (an
    automatically optimised one returns None from training_step; Lightning still counts the
    batch in global_step and steps the scheduler, but AdamW without gradients changes no weight
    and no state). Skipped updates are counted in `train/nonfinite_skipped`. After
    `optim_config.max_nonfinite_steps` in a row the state, still that of before the first bad
    step, is saved as the stage's last.ckpt and NonFiniteLossError stops training.

    A subclass names its `stage` and the `optim_key` its OptimConfig has in the Hydra config.
    """

    stage: str  # "tokenizer", "generator" or "clip"
    optim_key: str  # "tokenizer.optim" or "optim"
    nonfinite_skipped = 0  # updates skipped over the whole run, kept in checkpoints
    nonfinite_in_a_row = 0
    first_nonfinite_step = 0  # global_step of the first of the latest run of bad steps

    def loss_is_finite(self, loss: torch.Tensor) -> bool:
        """One device sync; under DDP every rank gets the same answer, so all skip together."""
        finite = bool(torch.isfinite(loss))
        return self.trainer.strategy.reduce_boolean_decision(finite, all=True)

    def step_is_finite(self, loss: torch.Tensor) -> bool:
        """True where the step's update may go ahead; otherwise count the skipped update, and
        stop training after `max_nonfinite_steps` in a row."""
        finite = self.loss_is_finite(loss)
        if finite:
            self.nonfinite_in_a_row = 0
        else:
            if self.nonfinite_in_a_row == 0:
                self.first_nonfinite_step = self.global_step
            self.nonfinite_in_a_row += 1
            self.nonfinite_skipped += 1
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
        if self.nonfinite_in_a_row >= self.optim_config.max_nonfinite_steps:
            self._save_and_stop()
        return finite

    def _save_and_stop(self) -> None:
        folder = Path(self.trainer.checkpoint_callback.dirpath)
        self.trainer.save_checkpoint(folder / "last.ckpt")
        raise NonFiniteLossError(
            f"{self.stage} training stopped after {self.nonfinite_in_a_row} steps in a row with "
            f"a NaN or infinite loss (from step {self.first_nonfinite_step} on), leaving "
            f"{folder / 'last.ckpt'} with the weights from before step "
            f"{self.first_nonfinite_step}: check the data for broken samples, or lower "
            f"{self.optim_key}.lr and delete {folder} to start over with it (a resumed run keeps "
            "the learning rate of its checkpoint)."
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_skipped = checkpoint.get("nonfinite_skipped", 0)
