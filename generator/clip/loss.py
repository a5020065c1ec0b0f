"""CLIP's contrastive loss with extra negative captions on the text side (NegCLIP's recipe).

Each image ranks the batch's captions and the hard negatives, captions that no image of the
batch shows (its captions' swapped twins); each caption ranks the batch's images as in CLIP.
The negatives add columns to the image-to-text logits and no rows: they have no image to match.
Without negatives this is open_clip's `ClipLoss`. Under DDP every rank's images and captions
are gathered (with their gradients) and each rank scores its own rows against all of them and
its own negatives, as open_clip's `local_loss` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import gather_features
from torch import nn


class HardNegativeLoss(nn.Module):
    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.rank = rank
        self.world_size = world_size

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        negatives: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        """image, text (B, E) paired unit vectors; negatives (H, E) unit vectors, H >= 0."""
        all_image, all_text = image, text
        if self.world_size > 1:
            all_image, all_text = gather_features(
                image,
                text,
                local_loss=True,
                gather_with_grad=True,
                rank=self.rank,
                world_size=self.world_size,
            )
        labels = torch.arange(image.shape[0], device=image.device) + image.shape[0] * self.rank
        per_image = logit_scale * image @ torch.cat([all_text, negatives]).T  # (B, B' + H)
        per_text = logit_scale * text @ all_image.T  # (B, B')
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
