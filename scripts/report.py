"""Write RUN/report.html: evaluation numbers, reconstructions, samples, variations, curves.

python scripts/report.py run_dir=RUN [data=...] ['prompts=[...]'] [num_images=8] [sampling.seed=0]
"""

import itertools
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from generator.report import write_report
from tokenizer import VQGAN
from tokenizer.data import build_dataset


def first_images(dataset, count: int) -> torch.Tensor:
    """The first `count` images of a dataset, map-style or streamed, as (B, 3, H, W)."""
    if hasattr(dataset, "__len__"):
        samples = [dataset[index] for index in range(min(count, len(dataset)))]
    else:
        samples = list(itertools.islice(iter(dataset), count))
    return torch.stack([sample.image for sample in samples])


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    with open_dict(cfg):
        cfg.data.image_size = VQGAN.from_pretrained(run_dir / "tokenizer").config.image_size
    dataset = build_dataset(instantiate(cfg.data, _convert_="all"), cfg.split)
    path = write_report(
        run_dir,
        first_images(dataset, cfg.num_originals),
        list(cfg.prompts),
        num_images=cfg.num_images,
        num_sources=cfg.num_sources,
        sampling=OmegaConf.to_container(cfg.sampling, resolve=True),
        device=cfg.device,
    )
    print(f"Report written to {path}")


if __name__ == "__main__":
    main()
