"""Variations of an image with a trained run: the source beside its variations as a PNG grid,
plus each image singly, paths printed.

    python scripts/variations.py run_dir=RUN image=PATH num_images=8 [seed=0] [keep_rows=0]
    python scripts/variations.py run_dir=RUN data=folder data.path=DIR held_out_images=3

The second varies the first 3 pictures of the folder's test split, one grid row each.
"""

from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from generator.held_out import held_out_images, run_data_config
from generator.images import output_dir, save_images
from generator.pipeline import DEFAULT_OPTIONS, Pipeline, Variations, resolve_device
from generator.sampling import SamplingOptions
from tokenizer.base.cli import run_command
from tokenizer.base.run_dir import RunDir


def sources_of(cfg: DictConfig) -> list[Path | torch.Tensor]:
    """The image file given, then the held-out pictures asked for."""
    sources: list[Path | torch.Tensor] = [Path(cfg.image)] if cfg.image else []
    if cfg.held_out_images:
        data_config = run_data_config(cfg.get("data"), cfg.run_dir)
        sources += list(held_out_images(data_config, cfg.split, cfg.held_out_images))
    if not sources:
        raise ValueError(
            "No source image given: pass image=PATH to an image file (or held_out_images=N "
            "with data=...)."
        )
    return sources


def grid_of(varied: Variations, per_source: int) -> tuple[torch.Tensor, list[str]]:
    """Each source followed by its variations, a row each, and the images' file stems."""
    rows = varied.sources.shape[0]
    images, names = [], []
    for row in range(rows):
        images += [varied.sources[row : row + 1], varied.images[varied.source_index == row]]
        prefix = f"{row:02d}-" if rows > 1 else ""
        names += [f"{prefix}source", *(f"{prefix}{column:03d}" for column in range(per_source))]
    return torch.cat(images), names


def make_variations(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    sources = sources_of(cfg)
    clip_config = instantiate(cfg.clip, _convert_="all") if cfg.get("clip") else None
    pipeline = Pipeline.from_run_dir(
        run_dir,
        resolve_device(cfg.device),
        clip_config,
        batch_size=cfg.batch_size,
        precision=cfg.precision,
    )
    options = SamplingOptions.from_settings(cfg, DEFAULT_OPTIONS)
    varied = pipeline.variations(sources, cfg.num_images, options, keep_rows=cfg.keep_rows)
    name = Path(cfg.image).stem if cfg.image else f"held-out {cfg.split}"
    directory = Path(cfg.out) if cfg.out else output_dir(RunDir(run_dir).variations, name, cfg.seed)
    images, names = grid_of(varied, cfg.num_images)
    saved = save_images(directory, images, names, per_row=cfg.num_images + 1)
    print(saved.grid)
    print("\n".join(map(str, saved.singles)))


@hydra.main(version_base="1.3", config_path="../conf", config_name="variations")
def main(cfg: DictConfig) -> None:
    run_command(make_variations, cfg)


if __name__ == "__main__":
    main()
