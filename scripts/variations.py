"""Variations of an image with a trained run: the source beside its variations as a PNG grid,
plus each image singly, paths printed.

    python scripts/variations.py run_dir=RUN image=PATH num_images=8 [seed=0] [keep_rows=0]
"""

from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from generator.images import grid_names, output_dir, save_images
from generator.pipeline import DEFAULT_OPTIONS, Pipeline, resolve_device
from generator.sampling import SamplingOptions
from tokenizer.base.cli import run_command
from tokenizer.base.run_dir import RunDir


def make_variations(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    if not cfg.image:
        raise ValueError("No source image given: pass image=PATH to an image file.")
    image = Path(cfg.image)
    clip_config = instantiate(cfg.clip, _convert_="all") if cfg.get("clip") else None
    pipeline = Pipeline.from_run_dir(
        run_dir,
        resolve_device(cfg.device),
        clip_config,
        batch_size=cfg.batch_size,
        precision=cfg.precision,
    )
    options = SamplingOptions.from_settings(cfg, DEFAULT_OPTIONS)
    varied = pipeline.variations(image, cfg.num_images, options, keep_rows=cfg.keep_rows)
    directory = (
        Path(cfg.out) if cfg.out else output_dir(RunDir(run_dir).variations, image.stem, cfg.seed)
    )
    images = torch.cat([varied.sources, varied.images])
    names = ["source", *grid_names(1, cfg.num_images)]
    saved = save_images(directory, images, names, per_row=cfg.num_images + 1)
    print(saved.grid)
    print("\n".join(map(str, saved.singles)))


@hydra.main(version_base="1.3", config_path="../conf", config_name="variations")
def main(cfg: DictConfig) -> None:
    run_command(make_variations, cfg)


if __name__ == "__main__":
    main()
