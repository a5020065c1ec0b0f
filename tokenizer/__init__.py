"""Stage one: images <-> discrete codes with a VQ-GAN."""

from tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from tokenizer.losses import LossConfig, MissingWeightsError, VQGANLoss
from tokenizer.quantizer import CodebookStats, QuantizerConfig, VectorQuantizer, codebook_stats
from tokenizer.vqgan import VQGAN, Decoder, Encoder, VQGANConfig

__all__ = [
    "VQGAN",
    "CodebookStats",
    "Decoder",
    "DiscriminatorConfig",
    "Encoder",
    "LossConfig",
    "MissingWeightsError",
    "PatchDiscriminator",
    "QuantizerConfig",
    "VQGANConfig",
    "VQGANLoss",
    "VectorQuantizer",
    "codebook_stats",
]
