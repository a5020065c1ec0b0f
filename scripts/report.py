"""Write RUN/report.html: evaluation numbers, reconstructions, samples, variations, curves.

python scripts/report.py run_dir=RUN [data=...] ['prompts=[...]'] [num_images=8] [sampling.seed=0]
"""

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from generator.evaluation import first_images
from generator.pipeline import DEFAULT_OPTIONS
from generator.report import write_report
from generator.sampling import SamplingOptions
from tokenizer import VQGAN
from tokenizer.base.cli import run_command
from tokenizer.base.run_dir import RunDir
from tokenizer.data import ImageDataModule


def report(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    run = RunDir(run_dir)
    with open_dict(cfg):
        cfg.data.image_size = VQGAN.from_pretrained(run.tokenizer).config.image_size
    data = ImageDataModule(instantiate(cfg.data, _convert_="all"))
    loader = getattr(data, f"{cfg.split}_dataloader")()
    path = write_report(
        run_dir,
        first_images(loader, cfg.num_originals),
        list(cfg.prompts),
        num_images=cfg.num_images,
        num_sources=cfg.num_sources,
        options=SamplingOptions.from_settings(cfg.sampling, DEFAULT_OPTIONS),
        device=cfg.device,
    )
    print(f"Report written to {path}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    run_command(report, cfg)


if __name__ == "__main__":
    main()
