"""Train the generator on RUN/encoded: RUN/generator/{model.safetensors,config.json,provenance.json}.

    python scripts/train_generator.py run_dir=RUN [generator=shapes|tiny|small|base|large] [trainer=...]
                                      [condition.mode=text|image|mixed] [ema_decay=0.999]

The vocabulary, code grid and CLIP width come from RUN/encoded/manifest.json (checked against
RUN/tokenizer). Run again on the same run_dir to resume from RUN/checkpoints/generator/last.ckpt.
"""

from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from generator.clip import encoding_clip
from generator.conditioning import check_captions
from generator.data import (
    EncodedDataModule,
    EncodedDataset,
    check_token_features,
    load_manifest,
)
from generator.export import Provenance, save_generator
from generator.module import GeneratorModule
from generator.sample_grid import SampleGrid, sample_prompts
from generator.sampling import SamplingOptions
from generator.shards import Manifest
from tokenizer.base.cli import run_command
from tokenizer.base.run_dir import RunDir
from tokenizer.base.training import build_trainer, fit_and_checkpoint


def sample_grid(cfg: DictConfig, run_dir: Path, manifest: Manifest) -> list[SampleGrid]:
    if cfg.samples.every_n_steps <= 0 or cfg.samples.num_prompts <= 0:
        return []
    split = "val" if any(record.name == "val" for record in manifest.splits) else "train"
    prompts = sample_prompts(EncodedDataset(run_dir, split, manifest), cfg.samples.num_prompts)
    run = RunDir(run_dir)
    grid = SampleGrid(
        run.tokenizer,
        prompts,
        run.logs("generator") / "samples",
        every_n_steps=cfg.samples.every_n_steps,
        per_prompt=cfg.samples.per_prompt,
        options=SamplingOptions(cfg_scale=cfg.samples.cfg_scale, seed=cfg.seed),
    )
    return [grid]


def token_sizes(fusion: str, manifest: Manifest, run_dir: Path) -> dict[str, int | bool]:
    """What the CLIP token features are (L, W, word embeddings or not) for a fusion that reads
    them, from the shards, which must hold them."""
    check_token_features(manifest, fusion != "pooled", run_dir)
    if fusion == "pooled":
        return {}
    length, width = manifest.plan.text_token_shape
    return {
        "num_condition_tokens": length,
        "token_dim": width,
        "word_embeddings": manifest.plan.word_embeddings,
    }


def train(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    run = RunDir(run_dir)
    L.seed_everything(cfg.seed, workers=True)
    manifest = load_manifest(run_dir)
    plan = manifest.plan
    model_config = instantiate(
        cfg.generator,
        vocab_size=plan.num_codes,
        grid_size=list(plan.grid_size),
        clip_dim=plan.embed_dim,
        **token_sizes(cfg.generator.get("fusion", "pooled"), manifest, run_dir),
        _convert_="all",
    )
    condition = instantiate(cfg.condition, _convert_="all")
    check_captions(manifest, condition, run_dir)
    provenance = Provenance(
        plan.tokenizer_fingerprint,
        plan.clip_fingerprint,
        condition.mode,
        clip=encoding_clip(run.encoded),
    )
    module = GeneratorModule.from_configs(
        model_config,
        instantiate(cfg.optim, _convert_="all"),
        condition,
        ema_decay=cfg.ema_decay,
        tokenizer_fingerprint=provenance.tokenizer_fingerprint,
        clip_fingerprint=provenance.clip_fingerprint,
    )
    print(f"Generator with {module.model.num_parameters():,} parameters")
    trainer = build_trainer(
        OmegaConf.to_container(cfg.trainer, resolve=True),
        run_dir,
        stage="generator",
        checkpoint_every_n_steps=cfg.checkpoint_every_n_steps,
        callbacks=sample_grid(cfg, run_dir, manifest),
    )
    data = EncodedDataModule(run_dir, cfg.data.batch_size, cfg.data.num_workers)
    module = fit_and_checkpoint(trainer, module, data, run_dir, stage="generator")
    if trainer.is_global_zero:
        exported = save_generator(module.exported_model, provenance, run.generator)
        print(f"Generator written to {exported}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_generator")
def main(cfg: DictConfig) -> None:
    run_command(train, cfg)


if __name__ == "__main__":
    main()
