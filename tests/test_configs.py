"""Every config in conf/ composes and instantiates (models are built, never trained)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tokenizer import VQGAN, LossConfig, VQGANConfig
from tokenizer.module import TokenizerModule
from tokenizer.optim import OptimConfig
from tokenizer.training import build_trainer

CONF = Path(__file__).resolve().parents[1] / "conf"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_config(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.mark.parametrize("preset", group_options("tokenizer"))
def test_every_tokenizer_preset_instantiates(preset):
    cfg = compose_config("train_tokenizer", [f"tokenizer={preset}"])
    model = instantiate(cfg.tokenizer.model, _convert_="all")
    loss = instantiate(cfg.tokenizer.loss, _convert_="all")
    optim = instantiate(cfg.tokenizer.optim, _convert_="all")
    assert isinstance(model, VQGANConfig) and isinstance(loss, LossConfig)
    assert isinstance(optim, OptimConfig)
    assert cfg.data.image_size == model.image_size, "data size must follow the tokenizer's"
    if loss.perceptual_weight > 0:  # LPIPS's VGG weights are not here: build only the model
        VQGAN(model)
    else:
        TokenizerModule.from_configs(model, loss, optim)


@pytest.mark.parametrize("data", group_options("data"))
def test_every_data_source_composes(data, tmp_path):
    overrides = [f"data={data}"] + ([] if data == "shapes" else [f"data.path={tmp_path}"])
    cfg = compose_config("train_tokenizer", overrides)
    config = instantiate(cfg.data, _convert_="all")
    assert config.image_size == cfg.tokenizer.model.image_size


@pytest.mark.parametrize("trainer", group_options("trainer"))
def test_every_trainer_config_builds_a_trainer(trainer, tmp_path):
    overrides = [f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=1"]
    cfg = compose_config("train_tokenizer", overrides)
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    built = build_trainer(options, tmp_path, stage="tokenizer", checkpoint_every_n_steps=10)
    assert built.max_steps == cfg.trainer.max_steps
    assert built.precision in ("32-true", "bf16-mixed")
