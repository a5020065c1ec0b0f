"""LightningModule for stage two: next-code prediction given a CLIP embedding.

Cross-entropy of the GPT's logits against the tokenizer's codes, the condition picked per
sample by `ConditionConfig` (see generator/conditioning/) and dropped to the learnt null
embedding with probability `p_uncond` for classifier-free guidance. AdamW decays the weight
matrices only (`GPT.param_groups`), under the shared warm-up + cosine schedule.

With `ema_decay` > 0 an exponential moving average of the weights is kept beside them; it is
what validation measures, what the sample grids show and what gets exported.

A step whose loss is NaN or infinite changes neither the weights nor their average (see
SkipsNonFiniteLoss).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F

from generator.conditioning import ConditionConfig, training_condition
from generator.data import EncodedSample
from generator.ema import EMA
from generator.gpt import GPT, GPTConfig
from tokenizer.base.configs import dataclass_from_dict
from tokenizer.base.optim import (
    ClipsGradientNorm,
    OptimConfig,
    SkipsNonFiniteLoss,
    adamw_with_schedule,
    schedule_length,
)
from tokenizer.base.weights import mismatched_tensors


class StepMetrics(NamedTuple):
    loss: torch.Tensor  # () mean cross-entropy per code
    accuracy: torch.Tensor  # () fraction of codes whose most likely prediction is right


class GeneratorModule(SkipsNonFiniteLoss, ClipsGradientNorm, L.LightningModule):
    stage = "generator"
    optim_key = "optim"

    def __init__(
        self,
        model: dict,
        optim: dict,
        condition: dict,
        ema_decay: float = 0.0,
        tokenizer_fingerprint: str = "",
        clip_fingerprint: str = "",
    ) -> None:
        """Configs arrive as plain dicts so the checkpoint's hyperparameters stay loadable
        with `weights_only=True`; they are checked by building their dataclasses. The
        fingerprints name the tokenizer and CLIP behind the shards, so that a resume on
        re-encoded shards is refused."""
        super().__init__()
        self.save_hyperparameters()
        self.model_config = dataclass_from_dict(GPTConfig, model, "generator")
        self.optim_config = dataclass_from_dict(OptimConfig, optim, "optim")
        self.condition_config = dataclass_from_dict(ConditionConfig, condition, "condition")
        self.model = GPT(self.model_config)
        self.ema = EMA(self.model, ema_decay) if ema_decay != 0 else None

    @classmethod
    def from_configs(
        cls,
        model: GPTConfig,
        optim: OptimConfig,
        condition: ConditionConfig,
        **kwargs: Any,
    ) -> GeneratorModule:
        as_dict = dataclasses.asdict
        return cls(as_dict(model), as_dict(optim), as_dict(condition), **kwargs)

    @property
    def exported_model(self) -> GPT:
        """The weights that are validated, sampled from and exported: the EMA ones where kept."""
        return self.ema.model if self.ema is not None else self.model

    def metrics(self, batch: EncodedSample, training: bool) -> StepMetrics:
        codes = batch.codes  # (B, T)
        condition = training_condition(
            batch, self.condition_config, self.model_config, training=training
        )
        model = self.model if training else self.exported_model
        logits = model(codes, condition)  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())
        accuracy = (logits.argmax(dim=-1) == codes).float().mean()
        return StepMetrics(loss, accuracy)

    def training_step(self, batch: EncodedSample, batch_idx: int) -> torch.Tensor | None:
        loss, accuracy = self.metrics(batch, training=True)
        size = batch.codes.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/accuracy", accuracy, batch_size=size)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss if self.step_is_finite(loss) else None

    def validation_step(self, batch: EncodedSample, batch_idx: int) -> None:
        loss, accuracy = self.metrics(batch, training=False)
        size = batch.codes.shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("val/accuracy", accuracy, batch_size=size, sync_dist=True)

    def on_train_batch_end(self, outputs: Any, batch: EncodedSample, batch_idx: int) -> None:
        if self.ema is not None and self.nonfinite_in_a_row == 0:  # not after a skipped step
            self.ema.update(self.model, self.global_step)

    def configure_optimizers(self) -> dict:
        total = schedule_length(self.trainer.max_steps)
        groups = self.model.param_groups(self.optim_config.weight_decay)
        return adamw_with_schedule(groups, self.optim_config, total).as_lightning()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check a resumed checkpoint before Lightning loads it, and follow an EMA switched on
        (started from the current weights) or off (dropped) since it was written."""
        super().on_load_checkpoint(checkpoint)
        self._check_fingerprints(checkpoint.get("hyper_parameters", {}))
        state = checkpoint["state_dict"]
        ema_names = [name for name in state if name.startswith("ema.")]
        if self.ema is None:
            for name in ema_names:
                del state[name]
        elif not ema_names:
            for name in [name for name in state if name.startswith("model.")]:
                state[f"ema.{name}"] = state[name].clone()
        expected = self.state_dict()
        wrong = mismatched_tensors(state, expected)
        if wrong:
            raise ValueError(
                f"the generator checkpoint being resumed has other sizes than the generator "
                f"config (tensors {wrong[:3]} differ): resume with the generator settings it was "
                "trained with, or delete RUN/checkpoints/generator to start over."
            )

    def _check_fingerprints(self, saved: dict[str, Any]) -> None:
        for key, what in (("tokenizer_fingerprint", "tokenizer"), ("clip_fingerprint", "CLIP")):
            before, now = saved.get(key, ""), self.hparams[key]
            if before and now and before != now:
                raise ValueError(
                    f"the generator checkpoint being resumed was trained on shards of another "
                    f"{what}: delete RUN/checkpoints/generator to train on the new shards from "
                    "the start."
                )
