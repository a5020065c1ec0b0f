"""Tokenizer evaluation: how faithfully codes give the images back.

PSNR and SSIM (torchmetrics), LPIPS where its weights exist, codebook usage and
perplexity over every code of the evaluation set, an optional Fréchet distance in a
feature space the caller provides (CLIP image features work offline), and on the shapes
benchmark the attribute checker's accuracy on reconstructions beside its accuracy on the
originals (PSNR misleads there: most pixels are flat background), over all images and apart
for images of a seen and of a held-out colour-shape pair: a tokenizer trained on the training
split has never seen the held-out pairs either.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance

from tokenizer import shapes
from tokenizer.data import Sample
from tokenizer.losses import MissingWeightsError, load_lpips
from tokenizer.quantizer import codebook_stats
from tokenizer.vqgan import VQGAN


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1) / 2).clamp(0, 1)


@dataclass
class TokenizerMetrics:
    num_images: int
    psnr: float
    ssim: float
    lpips: float | None  # None where LPIPS's VGG weights are not on this machine
    usage: float  # distinct codes / codebook size, over every code of the evaluated images
    perplexity: float
    num_codes_counted: int
    frechet_distance: float | None  # in the given feature space; None without one or 2 images
    checker_accuracy_originals: float | None  # shapes only
    checker_accuracy_reconstructions: float | None
    checker_ratio: float | None  # reconstructions / originals
    checker_ratio_by_pair: dict[str, float] | None  # "seen" / "held_out" colour-shape pairs


class FeatureExtractor(torch.nn.Module):
    """Wraps `features(images in [0, 1]) -> (B, D)` for torchmetrics' Fréchet distance."""

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], dim: int) -> None:
        super().__init__()
        self.features = features
        self.num_features = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images.float())


def optional_lpips(device: torch.device) -> torch.nn.Module | None:
    try:
        return load_lpips(allow_download=False).to(device)
    except MissingWeightsError:
        return None


@torch.no_grad()
def evaluate_tokenizer(
    vqgan: VQGAN,
    batches: Iterable[Sample],
    *,
    max_images: int | None = None,
    use_checker: bool,
    frechet_features: FeatureExtractor | None = None,
) -> TokenizerMetrics:
    """Encode and decode up to `max_images` images (None: every batch) and measure what comes
    back."""
    device = next(vqgan.parameters()).device
    vqgan.eval()
    psnr = PeakSignalNoiseRatio(data_range=1.0).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    lpips_model = optional_lpips(device)
    lpips_total = 0.0
    frechet = None
    if frechet_features is not None:
        frechet = FrechetInceptionDistance(feature=frechet_features, normalize=True).to(device)
    all_codes, seen = [], 0
    right_originals, right_reconstructions = Counter(), Counter()  # by pair group
    for batch in batches:
        remaining = None if max_images is None else max_images - seen
        images = batch.image[:remaining].to(device)
        codes = vqgan.encode(images)
        reconstructions = vqgan.decode(codes)
        originals, decoded = to_unit_range(images), to_unit_range(reconstructions)
        psnr.update(decoded, originals)
        ssim.update(decoded, originals)
        if lpips_model is not None:
            lpips_total += lpips_model(reconstructions, images).sum().item()
        if frechet is not None:
            frechet.update(originals, real=True)
            frechet.update(decoded, real=False)
        if use_checker:
            captions = batch.caption[: images.shape[0]]
            originals_read = shapes.check_batch(images.cpu())
            reconstructions_read = shapes.check_batch(reconstructions.cpu())
            for original, reconstruction, caption in zip(
                originals_read, reconstructions_read, captions, strict=True
            ):
                group = pair_group(original)
                right_originals[group] += shapes.scene_matches(original, caption)
                right_reconstructions[group] += shapes.scene_matches(reconstruction, caption)
        all_codes.append(codes.flatten().cpu())
        seen += images.shape[0]
        if max_images is not None and seen >= max_images:
            break
    if seen == 0:
        raise ValueError("the evaluation split yielded no images; check the data config.")
    stats = codebook_stats(torch.cat(all_codes), vqgan.num_codes)
    accuracy_originals = right_originals.total() / seen if use_checker else None
    accuracy_reconstructions = right_reconstructions.total() / seen if use_checker else None
    by_pair = None
    if use_checker:
        by_pair = {
            group: right_reconstructions[group] / right_originals[group]
            for group in sorted(right_originals, reverse=True)
            if right_originals[group]
        }
    return TokenizerMetrics(
        num_images=seen,
        psnr=psnr.compute().item(),
        ssim=ssim.compute().item(),
        lpips=lpips_total / seen if lpips_model is not None else None,
        usage=stats.usage,
        perplexity=stats.perplexity,
        num_codes_counted=stats.num_counted,
        frechet_distance=frechet.compute().item() if frechet is not None and seen > 1 else None,
        checker_accuracy_originals=accuracy_originals,
        checker_accuracy_reconstructions=accuracy_reconstructions,
        checker_ratio=(
            accuracy_reconstructions / accuracy_originals if accuracy_originals else None
        ),
        checker_ratio_by_pair=by_pair,
    )


def pair_group(scene: shapes.Scene) -> str:
    """A scene's group: "held_out" where it shows a colour-shape pair the training split never
    shows, else "seen"."""
    return "held_out" if shapes.is_held_out(scene) else "seen"
