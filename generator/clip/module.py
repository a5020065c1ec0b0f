"""LightningModule that trains a small CLIP from scratch on captioned images.

open_clip's `CLIP` class at the size of a `CLIPConfig`, open_clip's contrastive `ClipLoss`, and
a learnable temperature: the logits are `exp(logit_scale) * cos(image, text)`, with
`logit_scale` kept in [0, log 100] after every step as CLIP does, so the temperature never
falls below 1/100. Images go through the same `ImagePreprocess` that `CLIPEncoder` applies
later, so training and inference see identical inputs. A step whose loss is NaN or infinite
changes nothing (see SkipsNonFiniteLoss).

With `hard_negatives`, training steps use `HardNegativeLoss` (loss.py): the swapped twins the
batch carries (data.py) become extra negative captions of every image. Validation keeps CLIP's
own loss, so runs with and without them log comparable validation losses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import lightning as L
import open_clip
import torch

from generator.clip.config import CLIPConfig
from generator.clip.data import CaptionBatch
from generator.clip.encoder import ImagePreprocess
from generator.clip.evaluation import in_batch_accuracy
from generator.clip.loss import HardNegativeLoss
from generator.clip.trained import CachedTokenizer, build_small_clip, clip_tokenizer
from tokenizer.base.configs import dataclass_from_dict
from tokenizer.base.optim import (
    ClipsGradientNorm,
    OptimConfig,
    SkipsNonFiniteLoss,
    adamw_with_schedule,
    schedule_length,
)

MAX_LOGIT_SCALE = math.log(100)


class Embeddings(NamedTuple):
    image: torch.Tensor  # (B, E) unit vectors
    text: torch.Tensor  # (B, E) unit vectors


class CLIPModule(SkipsNonFiniteLoss, ClipsGradientNorm, L.LightningModule):
    stage = "clip"
    optim_key = "optim"

    def __init__(self, clip: dict, optim: dict, hard_negatives: bool = False) -> None:
        """Configs arrive as plain dicts so the checkpoint's hyperparameters stay loadable
        with `weights_only=True`; they are checked by building their dataclasses."""
        super().__init__()
        self.save_hyperparameters()
        self.clip_config = dataclass_from_dict(CLIPConfig, clip, "clip")
        if self.clip_config.source != "trained":
            raise ValueError(
                f"train_clip trains a small CLIP from scratch, but clip.source is "
                f"{self.clip_config.source!r}: pick a preset with source=trained (clip=shapes)."
            )
        self.optim_config = dataclass_from_dict(OptimConfig, optim, "optim")
        self.model = build_small_clip(self.clip_config)
        self.tokenize = CachedTokenizer(clip_tokenizer(self.clip_config))
        self.preprocess = ImagePreprocess.of(self.model)
        self.loss = open_clip.ClipLoss()
        self.hard_negatives = hard_negatives
        self.negative_loss = HardNegativeLoss()

    @classmethod
    def from_configs(
        cls, clip: CLIPConfig, optim: OptimConfig, hard_negatives: bool = False
    ) -> CLIPModule:
        return cls(dataclasses.asdict(clip), dataclasses.asdict(optim), hard_negatives)

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.model.parameters())

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:  # every rank's features become negatives for all
            self.loss = open_clip.ClipLoss(
                gather_with_grad=True, rank=self.global_rank, world_size=self.trainer.world_size
            )
            self.negative_loss = HardNegativeLoss(self.global_rank, self.trainer.world_size)

    def embed(self, batch: CaptionBatch) -> Embeddings:
        tokens = self.tokenize(batch.captions).to(self.device)  # (B, context_length)
        image = self.model.encode_image(self.preprocess(batch.images), normalize=True)
        return Embeddings(image, self.model.encode_text(tokens, normalize=True))

    def same_size_on_every_rank(self, batch: CaptionBatch) -> CaptionBatch:
        """The first items of `batch`, as many as the smallest batch of any rank holds.

        Under DDP the loss gathers every rank's features, which must be equally many, while
        distinct-caption batches lose a varying number of items (generator/clip/data.py)."""
        if self.trainer.world_size == 1:
            return batch
        size = torch.tensor(len(batch.captions), device=self.device)
        smallest = int(self.trainer.strategy.reduce(size, reduce_op="min"))
        return CaptionBatch(batch.images[:smallest], batch.captions[:smallest], batch.negatives)

    def _step(self, batch: CaptionBatch, split: str) -> torch.Tensor | None:
        batch = self.same_size_on_every_rank(batch)
        size = len(batch.captions)
        if size < 2:  # nothing to contrast with
            return None
        embeddings = self.embed(batch)
        loss = self._loss(batch, embeddings, with_negatives=split == "train")
        accuracy = in_batch_accuracy(embeddings.image.detach(), embeddings.text.detach())
        on_step = split == "train"
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=size, sync_dist=not on_step)
        self.log_dict(
            {
                f"{split}/image_to_text_top1": accuracy.image_to_text,
                f"{split}/text_to_image_top1": accuracy.text_to_image,
            },
            prog_bar=not on_step,
            batch_size=size,
            sync_dist=not on_step,
        )
        if on_step:
            self.log("train/logit_scale", self.model.logit_scale.exp().detach())
            self.log("train/batch_size", float(size))
            if self.hard_negatives:
                self.log("train/hard_negatives", float(len(batch.negatives)))
            self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def _loss(
        self, batch: CaptionBatch, embeddings: Embeddings, with_negatives: bool
    ) -> torch.Tensor:
        """CLIP's loss; in training with `hard_negatives`, the batch's twins as negatives."""
        scale = self.model.logit_scale.exp()
        if not (self.hard_negatives and with_negatives):
            return self.loss(embeddings.image, embeddings.text, scale)
        negatives = torch.empty(0, embeddings.text.shape[1], device=self.device)
        if batch.negatives:
            tokens = self.tokenize(list(batch.negatives)).to(self.device)
            negatives = self.model.encode_text(tokens, normalize=True)
        return self.negative_loss(embeddings.image, embeddings.text, negatives, scale)

    def training_step(self, batch: CaptionBatch, batch_idx: int) -> torch.Tensor | None:
        loss = self._step(batch, "train")
        return loss if loss is not None and self.step_is_finite(loss) else None

    def validation_step(self, batch: CaptionBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_train_batch_end(self, outputs: Any, batch: CaptionBatch, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def configure_optimizers(self) -> dict:
        """AdamW with weight decay on weight matrices (token embedding included), not on
        biases, norms, position embeddings, the class token or the temperature."""
        matrices = {
            name
            for name, parameter in self.model.named_parameters()
            if parameter.ndim >= 2 and "positional_embedding" not in name
        }
        groups = [
            {"params": [p for n, p in self.model.named_parameters() if n in matrices]},
            {
                "params": [p for n, p in self.model.named_parameters() if n not in matrices],
                "weight_decay": 0.0,
            },
        ]
        total = schedule_length(self.trainer.max_steps)
        return adamw_with_schedule(groups, self.optim_config, total).as_lightning()
