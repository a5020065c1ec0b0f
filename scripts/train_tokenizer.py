"""Train the VQ-GAN tokenizer: RUN/tokenizer/{model.safetensors,config.json}.

    python scripts/train_tokenizer.py run_dir=RUN [data=...] [tokenizer=...] [trainer=...]

Run again on the same run_dir to resume from RUN/checkpoints/tokenizer/last.ckpt.
"""

from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tokenizer.base.cli import run_command
from tokenizer.base.run_dir import RunDir
from tokenizer.base.training import build_trainer, fit_and_checkpoint
from tokenizer.data.datamodule import ImageDataModule
from tokenizer.module import TokenizerModule


def train(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    run = RunDir(run_dir)
    L.seed_everything(cfg.seed, workers=True)
    data_config = instantiate(cfg.data, _convert_="all")
    model_config = instantiate(cfg.tokenizer.model, _convert_="all")
    if data_config.image_size != model_config.image_size:
        raise ValueError(
            f"data.image_size={data_config.image_size} differs from tokenizer.model.image_size="
            f"{model_config.image_size}: drop the data.image_size override (it follows the "
            "tokenizer) or set tokenizer.model.image_size to the same value."
        )
    data = ImageDataModule(data_config)
    module = TokenizerModule.from_configs(
        model_config,
        instantiate(cfg.tokenizer.loss, _convert_="all"),
        instantiate(cfg.tokenizer.optim, _convert_="all"),
        disc_lr=cfg.tokenizer.disc_lr,
        image_dir=str(run.logs("tokenizer") / "images"),
    )
    trainer = build_trainer(
        OmegaConf.to_container(cfg.trainer, resolve=True),
        run_dir,
        stage="tokenizer",
        checkpoint_every_n_steps=cfg.checkpoint_every_n_steps,
    )
    module = fit_and_checkpoint(trainer, module, data, run_dir, stage="tokenizer")
    if trainer.is_global_zero:
        exported = module.vqgan.save_pretrained(run.tokenizer)
        print(f"Tokenizer written to {exported}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_tokenizer")
def main(cfg: DictConfig) -> None:
    run_command(train, cfg)


if __name__ == "__main__":
    main()
