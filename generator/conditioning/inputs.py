"""What a training sample is conditioned on: its caption's CLIP embedding, its image's, or
both, with the caption's token features where the fusion reads them, and the training drops.

CLIP puts text and images in one space, but not in the same region of it: the embedding of an
image and that of its caption are far apart (the "modality gap"). A generator trained on image
embeddings alone ("language-free", `image` mode) is prompted with text embeddings afterwards, so
during training its image embeddings are blurred towards the region text embeddings may occupy,
with LAFITE's pseudo-text embeddings

    normalize((1 - a) * image_embedding + a * noise / |noise|),   noise ~ N(0, I),

a fresh draw per sample and step, `a = image_noise`. Validation uses the clean embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from generator.conditioning.condition import Condition
from tokenizer.base.configs import checked_config

if TYPE_CHECKING:
    from generator.data import EncodedSample
    from generator.gpt import GPTConfig
    from generator.shards import Manifest

CONDITIONS = ("text", "image", "mixed")  # which CLIP embedding a generator is trained on


@checked_config("condition")
@dataclass
class ConditionConfig:
    mode: str = "text"  # "text", "image" (language-free) or "mixed"
    image_noise: float = 0.0  # LAFITE's a: 0 = clean image embeddings, 1 = pure noise
    image_probability: float = 0.0  # mixed only: chance of the image embedding despite a caption

    def __post_init__(self) -> None:
        if self.mode not in CONDITIONS:
            raise ValueError(
                f"condition.mode must be one of {list(CONDITIONS)}, got {self.mode!r}: text for "
                "captioned data, image for uncaptioned data, mixed for some of each."
            )
        if not 0 <= self.image_noise <= 1:
            raise ValueError(
                f"condition.image_noise must be in [0, 1], got {self.image_noise}; "
                "0.1 to 0.3 is a usual range."
            )
        if not 0 <= self.image_probability <= 1:
            raise ValueError(
                f"condition.image_probability must be in [0, 1], got {self.image_probability}."
            )


def pseudo_text_embedding(
    image_embedding: torch.Tensor, noise_level: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """LAFITE's pseudo-text embeddings (B, E) of unit image embeddings (B, E); see above."""
    if noise_level == 0:
        return image_embedding
    noise = torch.randn(
        image_embedding.shape,
        generator=generator,
        device=image_embedding.device,
        dtype=image_embedding.dtype,
    )
    mixed = (1 - noise_level) * image_embedding + noise_level * F.normalize(noise, dim=-1)
    return F.normalize(mixed, dim=-1)


class ChosenEmbedding(NamedTuple):
    embedding: torch.Tensor  # (B, E)
    from_image: torch.Tensor  # (B,) bool: the image's (or its pseudo-text) embedding was chosen


def choose_embedding(
    batch: EncodedSample,
    config: ConditionConfig,
    *,
    training: bool,
    generator: torch.Generator | None = None,
) -> ChosenEmbedding:
    """The CLIP embedding (B, E) each sample of a batch is conditioned on, and which are images'.

    `text`: the caption's. `image`: the image's, noised in training. `mixed`: the caption's
    where there is one, else the image's; in training also the image's with probability
    `image_probability`. Randomness (noise, the mixed draw) is for training only.
    """
    image = batch.image_embedding
    if training:
        image = pseudo_text_embedding(image, config.image_noise, generator)
    if config.mode == "image":
        return ChosenEmbedding(image, torch.ones_like(batch.has_text))
    if config.mode == "text":
        if not bool(batch.has_text.all()):
            raise ValueError(
                "condition.mode=text but some samples have no caption: use condition.mode=mixed "
                "(or image) for data where not every image has a caption."
            )
        return ChosenEmbedding(batch.text_embedding, torch.zeros_like(batch.has_text))
    use_image = ~batch.has_text
    if training and config.image_probability > 0:
        draws = torch.rand(use_image.shape, generator=generator, device=use_image.device)
        use_image = use_image | (draws < config.image_probability)
    return ChosenEmbedding(torch.where(use_image[:, None], image, batch.text_embedding), use_image)


def condition_embedding(
    batch: EncodedSample,
    config: ConditionConfig,
    *,
    training: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The pooled CLIP embedding (B, E) each sample is conditioned on; see choose_embedding."""
    return choose_embedding(batch, config, training=training, generator=generator).embedding


def training_condition(
    batch: EncodedSample,
    config: ConditionConfig,
    model: GPTConfig,
    *,
    training: bool,
    generator: torch.Generator | None = None,
) -> Condition:
    """Everything the generator reads for a batch: the chosen pooled embedding, the caption's
    token features where the fusion reads them (their null where the image's embedding was
    chosen), and in training the random drops: all inputs with probability `p_uncond`
    (classifier-free guidance), the token features alone with `p_drop_tokens`."""
    pooled, from_image = choose_embedding(batch, config, training=training, generator=generator)
    condition = Condition(pooled)
    if model.fusion != "pooled":
        condition = Condition(pooled, batch.text_tokens, batch.text_mask, drop_tokens=from_image)
    if not training:
        return condition
    batch_size, device = pooled.shape[0], pooled.device
    drop = torch.rand(batch_size, device=device, generator=generator) < model.p_uncond
    condition = condition._replace(drop=drop)
    if model.fusion != "pooled" and model.p_drop_tokens > 0:
        draws = torch.rand(batch_size, device=device, generator=generator)
        condition = condition._replace(drop_tokens=from_image | (draws < model.p_drop_tokens))
    return condition


def check_captions(manifest: Manifest, condition: ConditionConfig, run_dir: Path) -> None:
    """Text conditioning needs a caption for every training sample: say so before training."""
    train = manifest.split("train")
    if condition.mode == "text" and train.num_captioned < train.num_samples:
        raise ValueError(
            f"condition.mode=text but {train.num_samples - train.num_captioned} of the "
            f"{train.num_samples} training samples in {run_dir / 'encoded'} have no caption: "
            "use condition.mode=mixed, or condition.mode=image to train on images alone."
        )
