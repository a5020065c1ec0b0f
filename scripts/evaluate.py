"""Evaluate what a run directory holds; prints one JSON object last, writes RUN/eval.json.

python scripts/evaluate.py run_dir=RUN [data=...] [split=test] [max_images=1000]
"""

import dataclasses
import json
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from tokenizer import VQGAN
from tokenizer.data import ImageDataModule
from tokenizer.evaluation import evaluate_tokenizer
from tokenizer.io import atomic_write_text


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    device = torch.device(cfg.device)
    vqgan = VQGAN.from_pretrained(run_dir / "tokenizer", device=device)
    with open_dict(cfg):
        cfg.data.image_size = vqgan.config.image_size
    data_config = instantiate(cfg.data, _convert_="all")
    loader = getattr(ImageDataModule(data_config), f"{cfg.split}_dataloader")()
    tokenizer = evaluate_tokenizer(
        vqgan, loader, max_images=cfg.max_images, use_checker=data_config.source == "shapes"
    )
    results = {"split": cfg.split, "tokenizer": dataclasses.asdict(tokenizer)}
    text = json.dumps(results, indent=2)
    atomic_write_text(run_dir / "eval.json", text + "\n")
    print(f"Evaluation written to {run_dir / 'eval.json'}")
    print(text)


if __name__ == "__main__":
    main()
