"""Image files in and out of the pipeline: reading a source image, writing grids and singles.

Images cross this boundary as tensors: (3, H, W) float in [-1, 1] coming in (the tokenizer's
and CLIP's range), (N, 3, H, W) float in [0, 1] going out (what a PNG stores). Every file is
written atomically, so a killed run leaves whole PNGs or none.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from tokenizer.base.files import atomic_write, atomic_write_text
from tokenizer.data import load_rgb, to_rgb

MAX_PIXELS = 1 << 27  # Pillow's decompression-bomb limit, as for the datasets
MAX_SLUG_LENGTH = 60
PROMPTS_FILE = "prompts.json"  # beside text-to-image samples: the prompt of each row


class SavedImages(NamedTuple):
    grid: Path
    singles: list[Path]


class PromptedImages(NamedTuple):
    """Text-to-image samples: `per_prompt` images for each prompt, prompt by prompt."""

    prompts: list[str]  # (P,)
    images: torch.Tensor  # (P * per_prompt, 3, H, W) in [0, 1]
    per_prompt: int


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as (3, H, W) float in [-1, 1]; a clear error where it cannot be read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No image file at {path}: check the path given as image=.")
    try:
        image = load_rgb(path, MAX_PIXELS)
    except (OSError, ValueError, Image.DecompressionBombError, Warning) as error:
        raise ValueError(
            f"Cannot read {path} as an image ({type(error).__name__}: {error}): pass a PNG, JPEG "
            "or WebP file that opens in an image viewer."
        ) from None
    return read_pil(image)


def read_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode as (3, H, W) float in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 127.5 - 1  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def fit_to_size(images: torch.Tensor, size: int, what: str = "the image") -> torch.Tensor:
    """Centre-crop (B, 3, H, W) images to a square and resize them to `size`, with a note.

    The crop and resize are those of the datasets (shorter side, then centre), so a source
    image is read as the tokenizer saw its training images.
    """
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    warnings.warn(
        f"{what} is {width}x{height} px and the tokenizer reads {size}x{size}: it was "
        "centre-cropped to a square and resized.",
        stacklevel=3,
    )
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = images[..., top : top + side, left : left + side].float()
    resized = F.interpolate(square, size=(size, size), mode="bilinear", antialias=True)
    return resized.clamp(-1, 1)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    scaled = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return scaled.permute(1, 2, 0).cpu().numpy()


def save_png(path: str | Path, image: torch.Tensor) -> Path:
    """Write a (3, H, W) image in [0, 1] as a PNG, atomically."""
    picture = Image.fromarray(to_uint8(image))
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_images(
    directory: str | Path, images: torch.Tensor, names: list[str], per_row: int
) -> SavedImages:
    """Each of (N, 3, H, W) images in [0, 1] as `directory/<name>.png`, and all of them as
    `directory/grid.png` with `per_row` images a row."""
    directory = Path(directory)
    pairs = zip(names, images, strict=True)
    singles = [save_png(directory / f"{name}.png", image) for name, image in pairs]
    grid = torchvision.utils.make_grid(images.float().cpu(), nrow=per_row, padding=2, pad_value=1)
    return SavedImages(save_png(directory / "grid.png", grid), singles)


def save_prompted_images(directory: str | Path, samples: PromptedImages) -> SavedImages:
    """The samples as save_images writes them (a row per prompt), and their prompts in
    `directory/prompts.json`, so that the folder can be read back by `read_prompted_images`."""
    names = grid_names(len(samples.prompts), samples.per_prompt)
    saved = save_images(directory, samples.images, names, per_row=samples.per_prompt)
    listing = {"prompts": samples.prompts, "per_prompt": samples.per_prompt}
    atomic_write_text(Path(directory) / PROMPTS_FILE, json.dumps(listing, indent=2) + "\n")
    return saved


def read_prompted_images(directory: str | Path) -> PromptedImages:
    """The samples `save_prompted_images` wrote to `directory`."""
    directory = Path(directory)
    listing_file = directory / PROMPTS_FILE
    if not listing_file.is_file():
        raise FileNotFoundError(
            f"{directory} has no {PROMPTS_FILE}: point to a folder that scripts/sample.py wrote "
            "(its out=), or run it there again."
        )
    listing = json.loads(listing_file.read_text())
    prompts, per_prompt = listing["prompts"], listing["per_prompt"]
    files = [directory / f"{name}.png" for name in grid_names(len(prompts), per_prompt)]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} lacks {missing[0]} of its samples: run scripts/sample.py with "
            f"out={directory} again."
        )
    images = torch.stack([(read_image(file) + 1) / 2 for file in files])
    return PromptedImages(prompts, images, per_prompt)


def slugify(text: str, fallback: str = "sample") -> str:
    """A folder name from free text: lower-case words joined by '-', at most 60 characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:MAX_SLUG_LENGTH].rstrip("-") or fallback


def grid_names(rows: int, per_row: int) -> list[str]:
    """File stems for a grid of `rows` rows: 000, 001, ... or, for several rows, 00-000, ..."""
    if rows == 1:
        return [f"{column:03d}" for column in range(per_row)]
    return [f"{row:02d}-{column:03d}" for row in range(rows) for column in range(per_row)]


def output_dir(root: str | Path, name: str, seed: int | None) -> Path:
    """root/<slug of name>/seed<seed>; without a seed, a folder named by the time instead, so
    unseeded runs never overwrite each other."""
    tag = f"seed{seed}" if seed is not None else time.strftime("unseeded-%Y%m%d-%H%M%S")
    return Path(root) / slugify(name) / tag
