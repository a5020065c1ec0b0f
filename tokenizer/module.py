"""LightningModule for stage one: the VQ-GAN and its discriminator, two optimisers.

Manual optimisation: one autoencoder forward per batch, reused (detached) by the
discriminator step. The discriminator's optimiser steps through the plain torch optimiser
so that Lightning's `global_step` (and so `trainer.max_steps`) counts batches, not
optimiser calls; that bypass is exact for fp32 and bf16 (no gradient scaler involved).

A NaN or infinite autoencoder loss skips both updates (see SkipsNonFiniteLoss); the batch still
counts as a step. A non-finite discriminator loss alone skips the discriminator's update.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import torch
import torchvision
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from tokenizer.base.configs import dataclass_from_dict
from tokenizer.base.optim import (
    ClipsGradientNorm,
    OptimConfig,
    SkipsNonFiniteLoss,
    adamw_with_schedule,
    schedule_length,
)
from tokenizer.evaluation import to_unit_range
from tokenizer.losses import LossConfig, VQGANLoss
from tokenizer.quantizer import histogram_stats
from tokenizer.vqgan import VQGAN, VQGANConfig


class TokenizerModule(SkipsNonFiniteLoss, ClipsGradientNorm, L.LightningModule):
    stage = "tokenizer"
    optim_key = "tokenizer.optim"

    def __init__(
        self,
        model: dict,
        loss: dict,
        optim: dict,
        disc_lr: float | None = None,
        image_dir: str | None = None,
    ) -> None:
        """Configs arrive as plain dicts so the checkpoint's hyperparameters stay loadable
        with `weights_only=True`; they are checked by building their dataclasses."""
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model_config = dataclass_from_dict(VQGANConfig, model, "tokenizer.model")
        self.loss_config = dataclass_from_dict(LossConfig, loss, "tokenizer.loss")
        self.optim_config = dataclass_from_dict(OptimConfig, optim, "tokenizer.optim")
        self.vqgan = VQGAN(self.model_config)
        self.loss = VQGANLoss(self.loss_config)
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_codes: list[torch.Tensor] = []

    @classmethod
    def from_configs(
        cls, model: VQGANConfig, loss: LossConfig, optim: OptimConfig, **kwargs
    ) -> TokenizerModule:
        as_dict = dataclasses.asdict
        return cls(as_dict(model), as_dict(loss), as_dict(optim), **kwargs)

    def configure_optimizers(self):
        total = schedule_length(self.trainer.max_steps)
        autoencoder = adamw_with_schedule(self.vqgan.parameters(), self.optim_config, total)
        discriminator = adamw_with_schedule(
            self.loss.discriminator.parameters(), self.optim_config, total, lr=self.hparams.disc_lr
        )
        return [autoencoder.as_lightning(), discriminator.as_lightning()]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        images = batch.image
        step = self.global_step
        opt_ae, opt_disc = self.optimizers()
        sched_ae, sched_disc = self.lr_schedulers()

        with self.toggled_optimizer(opt_ae):  # no gradients into the discriminator here
            out = self.vqgan(images)
            ae = self.loss.autoencoder_loss(
                images, out.reconstructions, out.quantizer_loss, self.vqgan.decoder.last_layer, step
            )
            finite = self.step_is_finite(ae.total)
            opt_ae.zero_grad(set_to_none=True)
            if finite:
                self.manual_backward(ae.total)
                self.configure_gradient_clipping(opt_ae)
            opt_ae.step()  # without gradients a no-op, but the batch still counts as a step
        sched_ae.step()
        if not finite:
            return None

        if self.loss.discriminator_active(step):
            with self.toggled_optimizer(opt_disc):
                disc = self.loss.discriminator_loss(images, out.reconstructions.detach(), step)
                opt_disc.zero_grad(set_to_none=True)
                if self.loss_is_finite(disc.total):
                    self.manual_backward(disc.total)
                    self.configure_gradient_clipping(opt_disc)
                    opt_disc.optimizer.step()  # see the module docstring
                else:
                    self.nonfinite_skipped += 1
            sched_disc.step()
            self.log_dict(
                {
                    "train/disc_loss": disc.hinge,
                    "train/lecam": disc.lecam,
                    "train/logits_real": disc.logits_real,
                    "train/logits_fake": disc.logits_fake,
                }
            )

        self.log("train/loss", ae.total, prog_bar=True)
        self.log_dict(
            {
                "train/l1": ae.l1,
                "train/l2": ae.l2,
                "train/perceptual": ae.perceptual,
                "train/quantizer": ae.quantizer,
                "train/commitment": out.commitment_loss,
                "train/gan": ae.gan,
                "train/adaptive_weight": ae.adaptive_weight,
                "train/lr": sched_ae.get_last_lr()[0],
            }
        )
        if step % self.trainer.log_every_n_steps == 0:
            stats = self.vqgan.quantizer.stats()
            self.log("train/usage", stats.usage, prog_bar=True)
            self.log("train/perplexity", stats.perplexity)
            self.log("train/codes_restarted", self.vqgan.quantizer.num_restarted.float())
        return ae.total

    def validation_step(self, batch, batch_idx: int) -> None:
        images = batch.image
        out = self.vqgan(images)
        reconstructions = out.reconstructions.clamp(-1, 1)
        terms = self.loss.reconstruction_terms(images, reconstructions)
        self.psnr(to_unit_range(reconstructions), to_unit_range(images))
        self.ssim(to_unit_range(reconstructions), to_unit_range(images))
        self.log("val/l1", terms.l1, sync_dist=True)
        self.log("val/l2", terms.l2, sync_dist=True)
        self.log("val/psnr", self.psnr, prog_bar=True)
        self.log("val/ssim", self.ssim)
        self.val_codes.append(out.codes.flatten())
        if batch_idx == 0:
            self._save_grid(images, reconstructions)

    def on_validation_epoch_end(self) -> None:
        no_codes = torch.zeros(0, dtype=torch.long, device=self.device)
        codes = torch.cat(self.val_codes) if self.val_codes else no_codes
        self.val_codes.clear()
        # ranks may have validated different numbers of codes (WebDataset shards are uneven):
        # their histograms, one size everywhere, are what is summed across ranks
        counts = torch.bincount(codes, minlength=self.vqgan.num_codes)
        stats = histogram_stats(self.trainer.strategy.reduce(counts, reduce_op="sum"))
        if stats.num_counted == 0:
            return
        self.log("val/usage", stats.usage, prog_bar=True, rank_zero_only=True)
        self.log("val/perplexity", stats.perplexity, rank_zero_only=True)

    def _save_grid(self, images: torch.Tensor, reconstructions: torch.Tensor) -> None:
        """Originals (odd rows) over their reconstructions (even rows), as a PNG."""
        if self.hparams.image_dir is None or not self.trainer.is_global_zero:
            return
        count = min(8, images.shape[0])
        pairs = torch.stack([images[:count], reconstructions[:count]])  # (2, N, C, H, W)
        grid = torchvision.utils.make_grid(to_unit_range(pairs.flatten(0, 1)), nrow=count)
        path = Path(self.hparams.image_dir) / f"reconstructions_step{self.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(grid, path)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("val/reconstructions", grid, self.global_step)
