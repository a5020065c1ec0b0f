"""Decoding image files to 8-bit RGB (any Pillow mode, transparency, EXIF rotation, size limits)
and `ImageTransform`, which turns one into the square (3, H, W) tensor in [-1, 1] a Sample holds.
"""

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from tokenizer.data.config import DataConfig


def _integer_grey_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) greyscale, read as 0..65535, to 8-bit 'L'."""
    values = np.asarray(image, dtype=np.float32) / 257
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))


def _float_grey_to_8bit(image: Image.Image) -> Image.Image:
    """Floating-point greyscale, in [0, 1] or else in [0, 255], to 8-bit 'L'."""
    values = np.asarray(image, dtype=np.float32)
    values = values * 255 if np.nanmax(values) <= 1 else values
    return Image.fromarray(np.clip(np.nan_to_num(values), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image, alpha_background: int = 255) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited over a grey background."""
    if image.mode.startswith("I"):
        image = _integer_grey_to_8bit(image)
    elif image.mode == "F":
        image = _float_grey_to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # palette transparency given as bytes
            rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (alpha_background,) * 3 + (255,))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(
    source: str | Path | bytes,
    max_pixels: int,
    alpha_background: int = 255,
    min_side: int | None = None,
) -> Image.Image:
    """Decode an image file (a path or its bytes) to 8-bit RGB, upright per its EXIF.

    Raises on anything unreadable: an image over `max_pixels`, a truncated or corrupt file, or
    not an image at all. With `min_side`, a JPEG is decoded at the smallest scale whose sides
    are still at least that long, which keeps very large photos cheap.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(stream) as image:
            if min_side is not None:
                image.draft(None, (min_side, min_side))
            image.load()
            upright = ImageOps.exif_transpose(image)
    return to_rgb(upright, alpha_background)


class ImageTransform:
    """Resize the shorter side to image_size, crop a square, and scale to [-1, 1].

    Train mode adds the random crop and flip the config allows. A class, not a closure, so
    that DataLoader workers started by spawn can unpickle it.
    """

    def __init__(self, config: DataConfig, train: bool) -> None:
        size = config.image_size
        crop = v2.RandomCrop(size) if train and config.random_crop else v2.CenterCrop(size)
        steps = [v2.Resize(size, antialias=True), crop]
        if train and config.random_flip:
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
        self.pipeline = v2.Compose(steps)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline(image).as_subclass(torch.Tensor) * 2 - 1  # (3, size, size)
