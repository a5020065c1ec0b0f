"""Evaluate what a run directory holds; prints one JSON object last, writes RUN/eval.json.

    python scripts/evaluate.py run_dir=RUN [data=...] [split=test] [max_images=1000]

Tokenizer: reconstruction metrics (and a Fréchet distance in CLIP image-feature space when
RUN/clip holds a CLIP). CLIP, where present: zero-shot retrieval and the swap probe on shapes.
Generator, where RUN/generator exists: CLIP score and Fréchet distance of samples, on shapes
caption accuracy by the attribute checker (with and without guidance), and the consistency
and diversity of variations; see generator/evaluation.py.
"""

import dataclasses
import json
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from generator.clip import CLIPConfig, CLIPEncoder, load_clip
from generator.clip.evaluation import shapes_retrieval, swap_probe
from generator.evaluation import (
    GeneratorMetrics,
    caption_prompts,
    evaluate_generator,
    first_images,
    shapes_prompts,
    shapes_sources,
)
from generator.pipeline import Pipeline, resolve_device
from tokenizer import VQGAN
from tokenizer.base.cli import run_command
from tokenizer.base.files import atomic_write_text
from tokenizer.base.run_dir import RunDir, config_file
from tokenizer.data import DataConfig, ImageDataModule, build_dataset
from tokenizer.evaluation import FeatureExtractor, evaluate_tokenizer


def clip_in_run(run_dir: Path, device: torch.device) -> CLIPEncoder | None:
    """The CLIP trained into RUN/clip, or None where train_clip has not run."""
    run = RunDir(run_dir)
    if not config_file(run.clip).is_file():
        return None
    return load_clip(CLIPConfig(source="trained"), run_dir, device)


def clip_features(clip: CLIPEncoder) -> FeatureExtractor:
    """CLIP image embeddings of [0, 1] images, for the Fréchet distance."""
    return FeatureExtractor(lambda images: clip.encode_image(images * 2 - 1), clip.embed_dim)


def evaluate_generator_in_run(
    cfg: DictConfig, run_dir: Path, device: torch.device, data_config: DataConfig
) -> GeneratorMetrics:
    """Sample from the run's generator on prompts and images of the evaluation split."""
    clip_config = instantiate(cfg.clip, _convert_="all") if cfg.get("clip") else None
    pipeline = Pipeline.from_run_dir(run_dir, device, clip_config)
    config = instantiate(cfg.generation, _convert_="all")
    on_shapes = data_config.source == "shapes"
    if on_shapes:
        dataset = build_dataset(data_config, cfg.split)
        prompts = shapes_prompts(dataset, config.num_prompts)
        sources = shapes_sources(dataset, config.num_sources)
    else:
        loader = getattr(ImageDataModule(data_config), f"{cfg.split}_dataloader")
        prompts = caption_prompts(loader(), config.num_prompts)
        sources = first_images(loader(), config.num_sources)
    return evaluate_generator(pipeline, prompts, sources, config, use_checker=on_shapes)


def evaluate(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    run = RunDir(run_dir)
    device = resolve_device(cfg.device)
    vqgan = VQGAN.from_pretrained(run.tokenizer, device=device)
    clip = clip_in_run(run_dir, device)
    with open_dict(cfg):
        cfg.data.image_size = vqgan.config.image_size
    data_config = instantiate(cfg.data, _convert_="all")
    on_shapes = data_config.source == "shapes"
    loader = getattr(ImageDataModule(data_config), f"{cfg.split}_dataloader")()
    tokenizer = evaluate_tokenizer(
        vqgan,
        loader,
        max_images=cfg.max_images,
        use_checker=on_shapes,
        frechet_features=clip_features(clip) if clip is not None else None,
    )
    results = {"split": cfg.split, "tokenizer": dataclasses.asdict(tokenizer)}
    if clip is not None and on_shapes:
        split = build_dataset(data_config, cfg.split)
        retrieval = shapes_retrieval(clip, split, cfg.max_images)
        results["clip_retrieval"] = dataclasses.asdict(retrieval)
        results["clip_swap_probe"] = swap_probe(clip, split, cfg.max_images).as_dict()
    if run.generator.is_dir():
        generator = evaluate_generator_in_run(cfg, run_dir, device, data_config)
        results["generator"] = dataclasses.asdict(generator)
    text = json.dumps(results, indent=2)
    atomic_write_text(run.eval_file, text + "\n")
    print(f"Evaluation written to {run.eval_file}")
    print(text)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_command(evaluate, cfg)


if __name__ == "__main__":
    main()
