"""Stage-one losses: reconstruction + LPIPS perceptual + hinge patch-GAN with adaptive weight.

The discriminator starts training at `disc_start_step` and its loss reaches the
autoencoder `disc_warmup_steps` later: a discriminator that starts untrained hands the
decoder noise for gradients, and reconstructions get worse the moment it switches on.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from tokenizer.base.configs import checked_config
from tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator

VGG_WEIGHTS = torchvision.models.VGG16_Weights.IMAGENET1K_V1


@checked_config("tokenizer.loss")
@dataclass
class LossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    edge_weight: float = 0.0  # extra L1/L2 weight on pixels at colour edges (0 = uniform)
    perceptual_weight: float = 1.0  # 0 trains without LPIPS (and needs no VGG weights)
    perceptual_download: bool = True  # fetch VGG weights once where they are missing
    quantizer_weight: float = 1.0
    gan_weight: float = 0.5  # multiplies the adaptive weight
    disc_start_step: int = 5000  # the discriminator trains from this step
    disc_warmup_steps: int = 0  # ... and its loss reaches the autoencoder this much later
    adaptive_weight_max: float = 1e4
    lecam_weight: float = 0.0  # LeCam regularisation of the discriminator (0 = off)
    lecam_decay: float = 0.999
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def __post_init__(self) -> None:
        for name in (
            "l1_weight",
            "l2_weight",
            "edge_weight",
            "perceptual_weight",
            "gan_weight",
            "lecam_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}.")
        if self.disc_start_step < 0 or self.disc_warmup_steps < 0:
            raise ValueError("loss.disc_start_step and loss.disc_warmup_steps must be >= 0.")

    @property
    def gan_start_step(self) -> int:
        return self.disc_start_step + self.disc_warmup_steps


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are neither on disk nor downloadable."""


def vgg_checkpoint_path() -> Path:
    """Where torchvision looks for the VGG16 weights that LPIPS is built on."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(VGG_WEIGHTS.url)


def load_lpips(allow_download: bool = True) -> nn.Module:
    """The LPIPS (VGG) perceptual metric, frozen; a clear error where its weights are missing."""
    import lpips

    path = vgg_checkpoint_path()
    message = (
        f"LPIPS needs torchvision's VGG16 weights file '{path.name}' in {path.parent} "
        f"(torch hub's checkpoint folder). On a machine with internet, download "
        f"{VGG_WEIGHTS.url} and copy it there, or set loss.perceptual_weight=0 to train "
        f"without the perceptual loss."
    )
    if not path.is_file() and not allow_download:
        raise MissingWeightsError(message)
    try:
        with warnings.catch_warnings():  # lpips still passes torchvision's old `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net="vgg", pretrained=True, verbose=False)
    except OSError as error:  # URLError and failed downloads are OSErrors
        raise MissingWeightsError(f"{message} (download failed: {error})") from None
    return model.eval().requires_grad_(False)


def adaptive_gan_weight(
    reconstruction_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float,
) -> torch.Tensor:
    """||grad rec|| / (||grad gan|| + 1e-4) at the decoder's last layer, clamped, detached."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def edge_map(images: torch.Tensor, full_step: float = 0.25) -> torch.Tensor:
    """Where an image changes colour: 1 at an edge, 0 inside flat regions. (B, 1, H, W)

    The largest channel step to the right or lower neighbour, spread over a 3x3 window so
    both sides of an edge count, and with them every pixel of a shape a few pixels wide. A
    step of `full_step` (images in [-1, 1]) or more is a full edge. On mostly flat images,
    where the background outweighs a small shape by 20 to 1 in a uniform loss, this is
    what lets the shape's few pixels steer the autoencoder.
    """
    images = images.detach().float()
    step_x = (images[..., :, 1:] - images[..., :, :-1]).abs().amax(1, keepdim=True)
    step_y = (images[..., 1:, :] - images[..., :-1, :]).abs().amax(1, keepdim=True)
    step = torch.maximum(F.pad(step_x, (0, 1, 0, 0)), F.pad(step_y, (0, 0, 0, 1)))
    return (F.max_pool2d(step, 3, stride=1, padding=1) / full_step).clamp(max=1.0)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` (B, C, H, W) under per-pixel `weights` (B, 1, H, W); None = plain."""
    if weights is None:
        return values.mean()
    return (values * weights).mean() / weights.mean()


class ReconstructionTerms(NamedTuple):
    l1: torch.Tensor
    l2: torch.Tensor
    perceptual: torch.Tensor  # 0 where the perceptual loss is off


class AutoencoderLoss(NamedTuple):
    total: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor
    perceptual: torch.Tensor
    quantizer: torch.Tensor
    gan: torch.Tensor  # the generator's hinge term, before weighting
    adaptive_weight: torch.Tensor  # 0 while the GAN term is off


class DiscriminatorLoss(NamedTuple):
    total: torch.Tensor
    hinge: torch.Tensor
    lecam: torch.Tensor
    logits_real: torch.Tensor  # mean, for logging
    logits_fake: torch.Tensor


class VQGANLoss(nn.Module):
    """Owns the discriminator and LPIPS; the Lightning module owns the optimisation."""

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        self.config = config
        self.discriminator = PatchDiscriminator(config.discriminator)
        self.perceptual = (
            load_lpips(config.perceptual_download) if config.perceptual_weight > 0 else None
        )
        self.register_buffer("ema_logits_real", torch.zeros(()))
        self.register_buffer("ema_logits_fake", torch.zeros(()))

    def gan_active(self, step: int) -> bool:
        return step >= self.config.gan_start_step

    def discriminator_active(self, step: int) -> bool:
        return step >= self.config.disc_start_step

    def pixel_weights(self, images: torch.Tensor) -> torch.Tensor | None:
        """The training loss's per-pixel weights: 1 + edge_weight at edges; None = uniform."""
        if self.config.edge_weight == 0:
            return None
        return 1.0 + self.config.edge_weight * edge_map(images)

    def reconstruction_terms(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> ReconstructionTerms:
        error = reconstructions - images
        l1 = weighted_mean(error.abs(), weights)
        l2 = weighted_mean(error.square(), weights)
        perceptual = images.new_zeros(())
        if self.perceptual is not None:
            perceptual = self.perceptual(reconstructions.float(), images.float()).mean()
        return ReconstructionTerms(l1, l2, perceptual)

    def autoencoder_loss(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        quantizer_loss: torch.Tensor,
        last_layer: torch.Tensor,
        step: int,
    ) -> AutoencoderLoss:
        config = self.config
        weights = self.pixel_weights(images)
        l1, l2, perceptual = self.reconstruction_terms(images, reconstructions, weights)
        reconstruction = (
            config.l1_weight * l1 + config.l2_weight * l2 + config.perceptual_weight * perceptual
        )
        gan = adaptive_weight = images.new_zeros(())
        if self.gan_active(step) and config.gan_weight > 0:
            gan = -self.discriminator(reconstructions).mean()
            if self.training:
                adaptive_weight = adaptive_gan_weight(
                    reconstruction, gan, last_layer, config.adaptive_weight_max
                )
        total = (
            reconstruction
            + config.quantizer_weight * quantizer_loss
            + config.gan_weight * adaptive_weight * gan
        )
        return AutoencoderLoss(total, l1, l2, perceptual, quantizer_loss, gan, adaptive_weight)

    def discriminator_loss(
        self, images: torch.Tensor, reconstructions: torch.Tensor, step: int
    ) -> DiscriminatorLoss:
        """Hinge loss on real images and (detached) reconstructions, plus optional LeCam."""
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        hinge = F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()
        lecam = self._lecam(logits_real, logits_fake)
        weight = 1.0 if self.discriminator_active(step) else 0.0
        total = weight * (hinge + self.config.lecam_weight * lecam)
        return DiscriminatorLoss(
            total, hinge, lecam, logits_real.detach().mean(), logits_fake.detach().mean()
        )

    def _lecam(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """LeCam regulariser: keep D's outputs near the running means of the other side's."""
        if self.config.lecam_weight == 0:
            return logits_real.new_zeros(())
        if self.training:
            decay = self.config.lecam_decay  # the running means stay fp32 under bf16 autocast
            self.ema_logits_real.lerp_(logits_real.detach().float().mean(), 1 - decay)
            self.ema_logits_fake.lerp_(logits_fake.detach().float().mean(), 1 - decay)
        return (
            F.relu(logits_real - self.ema_logits_fake).pow(2).mean()
            + F.relu(self.ema_logits_real - logits_fake).pow(2).mean()
        )
