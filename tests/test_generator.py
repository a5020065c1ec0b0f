"""Stage two training: export round trips, run-directory checks, conditioning, EMA, training."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import (
    CLIP_DIM,
    GRID,
    VOCAB,
    FakeCLIP,
    fixed_batch_loader,
    run_script,
    save_tokenizer,
    tiny_config,
    tiny_module,
    unit,
    write_images,
)
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from generator.clip import CLIPConfig, record_encoding_clip
from generator.conditioning import (
    ConditionConfig,
    check_captions,
    condition_embedding,
    pseudo_text_embedding,
)
from generator.data import EncodedDataset, EncodedSample, load_manifest
from generator.encoding import encode_run
from generator.export import (
    WEIGHTS_FILE,
    Provenance,
    RunMismatchError,
    check_belongs_together,
    load_generator,
    save_generator,
)
from generator.gpt import GPT, GPTConfig
from generator.module import GeneratorModule
from generator.shards import tokenizer_fingerprint
from tokenizer import VQGAN, VQGANConfig
from tokenizer.base.optim import OptimConfig
from tokenizer.data import DataConfig
from tokenizer.quantizer import QuantizerConfig

ROOT = Path(__file__).resolve().parents[1]


def provenance_of(run_dir: Path) -> Provenance:
    return Provenance(
        tokenizer_fingerprint(run_dir / "tokenizer"), FakeCLIP().fingerprint(), "text"
    )


def batch_of(has_text: list[bool], dim: int = CLIP_DIM) -> EncodedSample:
    size = len(has_text)
    mask = torch.tensor(has_text)
    return EncodedSample(
        codes=torch.randint(0, VOCAB, (size, GRID[0] * GRID[1])),
        image_embedding=unit(size, dim, seed=1),
        text_embedding=unit(size, dim, seed=2) * mask[:, None],
        has_text=mask,
        caption=["a caption" if text else "" for text in has_text],
    )


# ---------------------------------------------------------------------------------------------
# Export


def test_saved_generator_loads_with_equal_logits(tmp_path):
    model = GPT(tiny_config()).eval()
    provenance = Provenance("tok", "clip", "mixed")
    save_generator(model, provenance, tmp_path / "generator")
    loaded = load_generator(tmp_path / "generator")
    codes, embedding = torch.randint(0, VOCAB, (3, 64)), unit(3, CLIP_DIM, seed=0)
    assert loaded.provenance == provenance
    assert loaded.model.config == model.config and not loaded.model.training
    assert torch.equal(loaded.model(codes, embedding), model(codes, embedding))
    assert not list((tmp_path / "generator").glob("*.tmp"))


def test_loading_a_missing_or_mismatched_generator_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run scripts/train_generator.py run_dir="):
        load_generator(tmp_path / "generator")
    save_generator(GPT(tiny_config()), Provenance("tok", "clip", "text"), tmp_path / "generator")
    config = json.loads((tmp_path / "generator" / "config.json").read_text())
    (tmp_path / "generator" / "config.json").write_text(json.dumps({**config, "dim": 32}))
    with pytest.raises(ValueError, match="does not match .*export the generator again"):
        load_generator(tmp_path / "generator")
    with pytest.raises(ValueError, match="condition must be one of"):
        Provenance("tok", "clip", "caption")


def test_a_generator_refuses_another_tokenizer_or_clip(tmp_path):
    save_tokenizer(tmp_path)
    model = GPT(tiny_config())
    provenance = provenance_of(tmp_path)
    clip = FakeCLIP().fingerprint()
    check_belongs_together(provenance, tmp_path, clip, config=model.config)  # its own: fine

    with pytest.raises(RunMismatchError, match="another\\s+CLIP"):
        check_belongs_together(
            provenance, tmp_path, FakeCLIP(seed=1).fingerprint(), config=model.config
        )
    save_tokenizer(tmp_path, seed=1)  # same sizes, other weights
    with pytest.raises(RunMismatchError, match="another tokenizer .*other weights"):
        check_belongs_together(provenance, tmp_path, clip, config=model.config)
    bigger = VQGANConfig.tiny(quantizer=QuantizerConfig(num_codes=128, code_dim=4))
    VQGAN(bigger).save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(RunMismatchError, match="codebook of 128 codes, not 64"):
        check_belongs_together(provenance, tmp_path, clip, config=model.config)
    with pytest.raises(RunMismatchError, match="another tokenizer"):
        check_belongs_together(provenance, tmp_path, config=model.config)


# ---------------------------------------------------------------------------------------------
# Conditioning


def test_each_condition_mode_picks_its_embedding():
    batch = batch_of([True, False, True, False])
    with pytest.raises(ValueError, match="condition.mode=mixed"):
        condition_embedding(batch, ConditionConfig("text"), training=True)
    captioned = batch_of([True, True])
    assert torch.equal(
        condition_embedding(captioned, ConditionConfig("text"), training=True),
        captioned.text_embedding,
    )
    image = condition_embedding(batch, ConditionConfig("image"), training=True)
    assert torch.equal(image, batch.image_embedding)
    mixed = condition_embedding(batch, ConditionConfig("mixed"), training=True)
    assert torch.equal(mixed[[0, 2]], batch.text_embedding[[0, 2]])
    assert torch.equal(mixed[[1, 3]], batch.image_embedding[[1, 3]])
    always_image = ConditionConfig("mixed", image_probability=1.0)
    assert torch.equal(condition_embedding(batch, always_image, training=True), image)
    assert torch.equal(condition_embedding(batch, always_image, training=False), mixed)


def test_image_noise_is_for_training_only_and_keeps_unit_norm():
    batch = batch_of([True] * 8)
    config = ConditionConfig("image", image_noise=0.3)
    noised = condition_embedding(batch, config, training=True)
    assert torch.allclose(noised.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert not torch.allclose(noised, batch.image_embedding)
    assert torch.equal(condition_embedding(batch, config, training=False), batch.image_embedding)
    mixed = condition_embedding(batch, ConditionConfig("mixed", image_noise=0.3), training=True)
    assert torch.equal(mixed, batch.text_embedding)  # captions are never noised


@pytest.mark.parametrize("noise_level", [0.0, 0.1, 0.5])
def test_pseudo_text_embedding_moves_by_the_configured_amount(noise_level):
    image = unit(64, 4096, seed=0)  # in high dimension the noise is orthogonal to the image
    noised = pseudo_text_embedding(image, noise_level, torch.Generator().manual_seed(1))
    cosine = (noised * image).sum(dim=-1)
    a = noise_level
    expected = (1 - a) / math.sqrt((1 - a) ** 2 + a**2)
    assert torch.allclose(noised.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert torch.allclose(cosine, torch.full((64,), expected), atol=0.02)


def test_condition_settings_are_checked():
    with pytest.raises(ValueError, match="condition.mode must be one of"):
        ConditionConfig("caption")
    with pytest.raises(ValueError, match="image_noise must be in \\[0, 1\\]"):
        ConditionConfig("image", image_noise=1.5)


# ---------------------------------------------------------------------------------------------
# Training


def fit(module: GeneratorModule, steps: int) -> None:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, fixed_batch_loader())


def test_loss_goes_down_on_a_fixed_batch():
    module = tiny_module()
    batch = next(iter(fixed_batch_loader()))
    before = module.metrics(batch, training=False)
    fit(module, steps=40)
    after = module.metrics(batch, training=False)
    assert before.loss > math.log(VOCAB) - 0.3  # a fresh model is about uniform
    assert after.loss < before.loss - 1.0
    assert after.accuracy > before.accuracy


def test_ema_weights_are_exported_and_lag_the_trained_ones(tmp_path):
    module = tiny_module(ema_decay=0.9)
    initial = [p.clone() for p in module.exported_model.parameters()]
    fit(module, steps=20)
    exported = module.exported_model
    assert exported is module.ema.model and exported is not module.model
    trained = dict(module.model.named_parameters())
    averaged = dict(exported.named_parameters())
    assert not all(torch.equal(averaged[n], trained[n]) for n in trained)
    assert not all(torch.equal(a, b) for a, b in zip(initial, exported.parameters(), strict=True))
    save_generator(exported, Provenance("tok", "clip", "text"), tmp_path / "generator")
    saved = load_file(tmp_path / "generator" / WEIGHTS_FILE)
    assert torch.equal(saved["head.weight"], averaged["head.weight"])
    assert not any(name.startswith("ema.") for name in saved)
    assert "ema.model.head.weight" in module.state_dict()  # in every checkpoint


def test_resume_follows_an_ema_switch_and_refuses_other_shards():
    plain, with_ema = tiny_module(), tiny_module(ema_decay=0.99)
    checkpoint = {"state_dict": plain.state_dict(), "hyper_parameters": dict(plain.hparams)}
    with_ema.on_load_checkpoint(checkpoint)
    with_ema.load_state_dict(checkpoint["state_dict"])  # started from the trained weights
    assert torch.equal(with_ema.ema.model.head.weight, plain.model.head.weight)

    resumed = GeneratorModule.from_configs(
        tiny_config(),
        OptimConfig(),
        ConditionConfig(),
        tokenizer_fingerprint="new",
        clip_fingerprint="clip",
    )
    old = {"tokenizer_fingerprint": "old", "clip_fingerprint": "clip"}
    with pytest.raises(ValueError, match="another tokenizer: delete RUN/checkpoints/generator"):
        resumed.on_load_checkpoint({"state_dict": resumed.state_dict(), "hyper_parameters": old})
    wider = GeneratorModule.from_configs(tiny_config(dim=32), OptimConfig(), ConditionConfig())
    with pytest.raises(ValueError, match="other sizes than the generator config"):
        wider.on_load_checkpoint({"state_dict": plain.state_dict(), "hyper_parameters": {}})


# ---------------------------------------------------------------------------------------------
# Configs and the entry point


@pytest.mark.parametrize("name", ["tiny", "small", "base", "large"])
def test_generator_configs_are_the_presets_and_never_type_the_sizes(name):
    config = OmegaConf.load(ROOT / "conf" / "generator" / f"{name}.yaml")
    assert not {"vocab_size", "grid_size", "clip_dim"} & set(config)
    conditioning = {"fusion", "num_latents", "cross_attention_every", "p_drop_tokens"}
    assert conditioning <= set(config)  # Hydra refuses `generator.fusion=...` for a missing key
    built = instantiate(config, vocab_size=VOCAB, grid_size=GRID, clip_dim=CLIP_DIM)
    assert built == GPTConfig.preset(name, vocab_size=VOCAB, grid_size=GRID, clip_dim=CLIP_DIM)


def test_train_generator_config_composes_with_its_defaults():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train_generator",
            overrides=["run_dir=RUN", "condition.mode=image", "condition.image_noise=0.2"],
        )
    condition = instantiate(cfg.condition, _convert_="all")
    assert condition == ConditionConfig("image", image_noise=0.2)
    assert isinstance(instantiate(cfg.optim, _convert_="all"), OptimConfig)
    assert cfg.generator.dim % cfg.generator.num_heads == 0


def test_train_generator_script_exports_and_resumes(encoded_run):
    common = [
        f"run_dir={encoded_run}",
        "generator=tiny",
        "data.batch_size=4",
        "data.num_workers=0",
        "ema_decay=0.9",
        "samples.every_n_steps=2",
        "samples.num_prompts=3",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "checkpoint_every_n_steps=2",
        "trainer.enable_progress_bar=false",
    ]
    encoding_clip_config = CLIPConfig(source="pretrained", model_name="ViT-B-32")
    record_encoding_clip(encoding_clip_config, encoded_run / "encoded")  # as encode.py does
    first = run_script("train_generator.py", *common, "trainer.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    loaded = load_generator(encoded_run / "generator")
    assert loaded.provenance.clip == encoding_clip_config
    assert loaded.model.config.vocab_size == VOCAB and loaded.model.config.grid_size == GRID
    assert loaded.model.config.clip_dim == CLIP_DIM
    check_belongs_together(
        loaded.provenance, encoded_run, FakeCLIP().fingerprint(), config=loaded.model.config
    )
    samples = encoded_run / "logs" / "generator" / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == [
        "samples_step0000002.png",
        "samples_step0000003.png",
    ]
    prompts = (samples / "prompts.txt").read_text().splitlines()
    assert prompts == [EncodedDataset(encoded_run, "val")[i].caption for i in range(3)]

    second = run_script("train_generator.py", *common, "trainer.max_steps=5")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in second.stdout
    checkpoint = torch.load(
        encoded_run / "checkpoints" / "generator" / "last.ckpt", weights_only=True
    )
    assert checkpoint["global_step"] == 5
    assert "ema.model.head.weight" in checkpoint["state_dict"]  # the average resumes too
    resumed = load_generator(encoded_run / "generator").model
    assert not torch.equal(resumed.head.weight, loaded.model.head.weight)


def test_text_conditioning_on_uncaptioned_shards_is_refused_before_training(tmp_path):
    save_tokenizer(tmp_path)
    images = tmp_path / "images"
    write_images(images)  # two of the ten readable images have no caption
    config = DataConfig(source="folder", path=str(images), val_fraction=0.0, num_workers=0)
    encode_run(tmp_path, config, FakeCLIP(), splits=["train"], shard_size=4)
    manifest = load_manifest(tmp_path)
    with pytest.raises(ValueError, match="2 of the 10 training samples .* condition.mode=mixed"):
        check_captions(manifest, ConditionConfig("text"), tmp_path)
    check_captions(manifest, ConditionConfig("mixed"), tmp_path)
