"""Every config in conf/ composes and instantiates (models are built, never trained)."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from generator.clip import CLIPConfig
from generator.conditioning import ConditionConfig
from generator.gpt import GPT, GPTConfig
from generator.shards import EncodingPlan, codes_dtype
from tokenizer import VQGAN, LossConfig, VQGANConfig
from tokenizer.base.optim import OptimConfig
from tokenizer.base.training import build_trainer
from tokenizer.data import DataConfig
from tokenizer.module import TokenizerModule
from tokenizer.quantizer import QuantizerConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


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
    if trainer == "fsdp":  # Lightning runs FSDP on CUDA only: its strategy is built, then refused
        with pytest.raises(ValueError, match="strategy `fsdp` requires a GPU accelerator"):
            build_trainer(options, tmp_path, stage="tokenizer", checkpoint_every_n_steps=10)
        return
    built = build_trainer(options, tmp_path, stage="tokenizer", checkpoint_every_n_steps=10)
    assert built.max_steps == cfg.trainer.max_steps
    assert built.precision in ("32-true", "bf16-mixed")


BAD_OVERRIDES = [
    ("train_tokenizer", "+tokenizer.model.bogus=1", "tokenizer.model: unknown field(s) ['bogus']"),
    ("train_tokenizer", "+tokenizer.model.quantizer.num_code=9", "did you mean ['num_codes']"),
    ("train_tokenizer", "tokenizer.model.quantizer.num_codes=abc", "num_codes must be int"),
    ("train_tokenizer", "tokenizer.loss.discriminator.num_layers=2.5", "num_layers must be int"),
    ("train_tokenizer", "data.batch_size=1.5", "data: batch_size must be int, got 1.5"),
    (
        "train_tokenizer",
        "tokenizer.model.image_size=34",
        "tokenizer.model.image_size=34 is not divisible",
    ),
    ("train_generator", "optim.lr=fast", "optim: lr must be float, got 'fast'"),
    ("train_generator", "condition.mode=[text]", "condition: mode must be str"),
    ("train_clip", "clip.context_length=long", "clip: context_length must be int"),
]


@pytest.mark.parametrize(("config_name", "override", "message"), BAD_OVERRIDES)
def test_bad_config_values_fail_at_start_naming_the_key(config_name, override, message):
    cfg = compose_config(config_name, [override])
    nodes = ("data", "clip", "condition", "optim", "tokenizer.model", "tokenizer.loss")
    with pytest.raises(Exception, match=re.escape(message)):
        for node in nodes:
            if OmegaConf.select(cfg, node) is not None:
                instantiate(OmegaConf.select(cfg, node), _convert_="all")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: VQGANConfig.tiny(bogus=1), "unknown field(s) ['bogus'] for VQGANConfig"),
        (lambda: QuantizerConfig(64.5), "tokenizer.model.quantizer: num_codes must be int"),
        (lambda: DataConfig(num_workers=True), "data: num_workers must be int, got True"),
        (lambda: LossConfig(gan_weight="0.1"), "tokenizer.loss: gan_weight must be float"),
        (
            lambda: GPTConfig.preset("tiny", vocab_size=64, grid_size=(8, 8), clip_dim="64"),
            "generator: clip_dim must be int",
        ),
        (lambda: CLIPConfig("trained", embed_dim=64.0), "clip: embed_dim must be int"),
        (lambda: ConditionConfig(image_noise=None), "condition: image_noise must be float"),
    ],
)
def test_configs_built_in_code_are_checked_too(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_checked_configs_coerce_what_hydra_and_json_hand_them():
    config = VQGANConfig(channel_multipliers=[1, 2], quantizer={"num_codes": 70_000})
    assert config.channel_multipliers == (1, 2) and config.quantizer.num_codes == 70_000
    assert DataConfig(val_fraction=0).val_fraction == 0.0
    assert isinstance(DataConfig(val_fraction=0).val_fraction, float)


def test_codebooks_over_uint16_get_wider_codes_and_uint16_cannot_be_asked_for():
    assert codes_dtype(2**16) == "uint16" and codes_dtype(2**16 + 1) == "int32"
    codes = np.array([0, 2**16 - 1, 2**16, 99_999]).astype(codes_dtype(100_000))
    assert codes.tolist() == [0, 2**16 - 1, 2**16, 99_999]
    plan = dict(
        tokenizer_fingerprint="t",
        clip_fingerprint="c",
        num_codes=100_000,
        grid_size=(8, 8),
        image_size=32,
        embed_dim=64,
        codes_dtype="int32",
        embedding_dtype="float16",
        shard_size=16,
        batch_size=4,
        data={},
    )
    assert EncodingPlan(**plan).codes_dtype == "int32"
    with pytest.raises(ValueError, match=r"codes_dtype='uint16' cannot hold 100000 codes"):
        EncodingPlan(**{**plan, "codes_dtype": "uint16"})


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=1.5", "data: batch_size must be int, got 1.5"),
        ("data.image_size=48", "data.image_size=48 differs from tokenizer.model.image_size=32"),
    ],
)
def test_a_bad_override_stops_the_script_before_any_work(tmp_path, override, message):
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_tokenizer.py"
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "tokenizer=tiny", override]
    done = subprocess.run([sys.executable, str(script), *overrides], capture_output=True, text=True)
    assert done.returncode != 0
    assert message in done.stderr
    written = [p for p in run_dir.rglob("*") if p.is_file() and "logs" not in p.parts]
    assert written == []  # Hydra's logs only: no checkpoint, no export


@pytest.mark.parametrize("preset", group_options("tokenizer"))
def test_every_loss_weight_and_optimiser_setting_is_overridable(preset):
    """Hydra refuses `key=value` for a key the preset does not list: list them all."""
    weights = [f.name for f in dataclasses.fields(LossConfig) if f.name.endswith("_weight")]
    settings = [f"tokenizer.loss.{name}=0.5" for name in weights] + [
        f"tokenizer.optim.{f.name}={f.default}"
        for f in dataclasses.fields(OptimConfig)
        if f.name != "betas"
    ]
    cfg = compose_config("train_tokenizer", [f"tokenizer={preset}", *settings])
    loss = instantiate(cfg.tokenizer.loss, _convert_="all")
    assert all(getattr(loss, name) == 0.5 for name in weights)
    instantiate(cfg.tokenizer.optim, _convert_="all")


@pytest.mark.parametrize(
    ("preset", "low", "high"), [("base", 100e6, 120e6), ("large", 300e6, 350e6)]
)
def test_real_size_generators_have_their_size_over_the_photo_tokenizer(preset, low, high):
    """About 100M and 300M parameters over photo_f16's 16,384 codes and ViT-B/32's 512 wide
    embeddings, as the README's "Real-size presets" table says."""
    tokenizer = compose_config("train_tokenizer", ["tokenizer=photo_f16"]).tokenizer.model
    tokenizer = instantiate(tokenizer, _convert_="all")
    config = instantiate(
        compose_config("train_generator", [f"generator={preset}"]).generator,
        vocab_size=tokenizer.quantizer.num_codes,
        grid_size=list(tokenizer.grid_size),
        clip_dim=512,
        _convert_="all",
    )
    with torch.device("meta"):  # counts parameters without allocating them
        assert low < GPT(config).num_parameters() < high
