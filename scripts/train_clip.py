"""Train a small CLIP on the dataset's captions: RUN/clip/{model.safetensors,config.json}.

    python scripts/train_clip.py run_dir=RUN [clip=shapes|tiny] [data=...] [trainer=...]

Run again on the same run_dir to resume from RUN/checkpoints/clip/last.ckpt. On shapes data
the script ends with the zero-shot retrieval of the exported CLIP on the test split and its
swap probe (true caption against its colour-, shape-, size- and relation-swapped twins), as JSON.
"""

import dataclasses
import json
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from generator.clip import load_clip, save_trained_clip
from generator.clip.data import CaptionDataModule
from generator.clip.evaluation import shapes_retrieval, swap_probe
from generator.clip.module import CLIPModule
from tokenizer.base.cli import run_command
from tokenizer.base.run_dir import RunDir
from tokenizer.base.training import build_trainer, fit_and_checkpoint
from tokenizer.data import build_dataset, has_split


def train(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    run = RunDir(run_dir)
    L.seed_everything(cfg.seed, workers=True)
    data_config = instantiate(cfg.data, _convert_="all")
    clip_config = instantiate(cfg.clip, _convert_="all")
    optim_config = instantiate(cfg.optim, _convert_="all")
    module = CLIPModule.from_configs(clip_config, optim_config, cfg.hard_negatives)
    print(f"CLIP with {module.num_parameters():,} parameters")
    trainer = build_trainer(
        OmegaConf.to_container(cfg.trainer, resolve=True),
        run_dir,
        stage="clip",
        checkpoint_every_n_steps=cfg.checkpoint_every_n_steps,
    )
    data = CaptionDataModule(data_config, cfg.canonical_captions, cfg.hard_negatives)
    module = fit_and_checkpoint(trainer, module, data, run_dir, stage="clip")
    if not trainer.is_global_zero:
        return
    exported = save_trained_clip(module.model, module.clip_config, run.clip)
    print(f"CLIP written to {exported}")
    if data_config.source == "shapes" and cfg.eval_images > 0 and has_split(data_config, "test"):
        encoder = load_clip(dataclasses.replace(clip_config, checkpoint=str(exported)))
        test = build_dataset(data_config, "test")
        scores = shapes_retrieval(encoder, test, cfg.eval_images)
        probe = swap_probe(encoder, test, cfg.eval_images)
        summary = {"clip_retrieval": dataclasses.asdict(scores), "clip_swap_probe": probe.as_dict()}
        print(json.dumps(summary))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_clip")
def main(cfg: DictConfig) -> None:
    run_command(train, cfg)


if __name__ == "__main__":
    main()
