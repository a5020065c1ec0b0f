"""Evaluate what a run directory holds; prints one JSON object last, writes RUN/eval.json.

    python scripts/evaluate.py run_dir=RUN [data=...] [split=test] [max_images=null]
    python scripts/evaluate.py run_dir=RUN data=folder data.path=OTHER split=all with_generator=false

The first scores the run's own held-out split into RUN/eval.json. `split=all` scores every image
under data.path (a folder or shards, whatever split each would fall in) into
RUN/eval_all_<folder name>.json, leaving RUN/eval.json alone: how the run's tokenizer does on
pictures it never saw.

Tokenizer: reconstruction metrics (and a Fréchet distance in CLIP image-feature space when
RUN/clip holds a CLIP). CLIP, where present: zero-shot retrieval and the swap probe on shapes,
retrieval among each batch's captions on other data.
Generator, where RUN/generator exists: CLIP score and Fréchet distance of samples, on shapes
caption accuracy by the attribute checker (with and without guidance), and the consistency
and diversity of variations; see generator/evaluation.py.
"""

import dataclasses
import json
import re
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from generator.clip import CLIPConfig, CLIPEncoder, load_clip
from generator.clip.evaluation import in_batch_retrieval, shapes_retrieval, swap_probe
from generator.evaluation import (
    GeneratorMetrics,
    caption_prompts,
    evaluate_generator,
    first_images,
    shapes_prompts,
    shapes_sources,
)
from generator.held_out import ALL, run_data_config, split_batches
from generator.pipeline import Pipeline, resolve_device
from tokenizer import VQGAN
from tokenizer.base.cli import run_command
from tokenizer.base.files import atomic_write_text
from tokenizer.base.run_dir import RunDir, config_file
from tokenizer.data import DataConfig, build_dataset
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
    pipeline = Pipeline.from_run_dir(run_dir, device, clip_config, precision=cfg.precision)
    config = instantiate(cfg.generation, _convert_="all")
    on_shapes = data_config.source == "shapes"
    if on_shapes:
        dataset = build_dataset(data_config, cfg.split)
        prompts = shapes_prompts(dataset, config.num_prompts)
        sources = shapes_sources(dataset, config.num_sources)
    else:
        prompts = caption_prompts(split_batches(data_config, cfg.split), config.num_prompts)
        sources = first_images(split_batches(data_config, cfg.split), config.num_sources)
    return evaluate_generator(pipeline, prompts, sources, config, use_checker=on_shapes)


def results_file(run: RunDir, split: str, data_config: DataConfig) -> Path:
    """RUN/eval.json for the run's own split; a file named after the folder for split=all."""
    if split != ALL:
        return run.eval_file
    name = re.sub(r"[^\w.-]+", "_", Path(data_config.path.rstrip("/")).name) or "data"
    return run.eval_file.with_name(f"eval_all_{name}.json")


def evaluate(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    run = RunDir(run_dir)
    device = resolve_device(cfg.device)
    vqgan = VQGAN.from_pretrained(run.tokenizer, device=device)
    clip = clip_in_run(run_dir, device)
    data_config = run_data_config(cfg.data, run_dir)
    on_shapes = data_config.source == "shapes"
    tokenizer = evaluate_tokenizer(
        vqgan,
        split_batches(data_config, cfg.split),
        max_images=cfg.max_images,
        use_checker=on_shapes,
        frechet_features=clip_features(clip) if clip is not None else None,
    )
    results = {"split": cfg.split, "data": data_config.path or data_config.source}
    results["tokenizer"] = dataclasses.asdict(tokenizer)
    if clip is not None and on_shapes:
        split = build_dataset(data_config, cfg.split)
        retrieval = shapes_retrieval(clip, split, cfg.max_images)
        results["clip_retrieval"] = dataclasses.asdict(retrieval)
        results["clip_swap_probe"] = swap_probe(clip, split, cfg.max_images).as_dict()
    elif clip is not None:
        batches = split_batches(data_config, cfg.split)
        retrieval = in_batch_retrieval(clip, batches, cfg.max_images)
        results["clip_in_batch_retrieval"] = {
            "batch_size": data_config.batch_size,
            **dataclasses.asdict(retrieval),
        }
    if cfg.with_generator and run.generator.is_dir():
        generator = evaluate_generator_in_run(cfg, run_dir, device, data_config)
        results["generator"] = dataclasses.asdict(generator)
    text = json.dumps(results, indent=2)
    out = results_file(run, cfg.split, data_config)
    atomic_write_text(out, text + "\n")
    print(f"Evaluation written to {out}")
    print(text)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_command(evaluate, cfg)


if __name__ == "__main__":
    main()
