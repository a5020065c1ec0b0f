"""The encode section: scripts/encode.py's per-batch work (codes, CLIP image and caption
embeddings) through encode_batch, with a tokenizer and a randomly initialised CLIP."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import open_clip
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from generator.bench.progress import per_s, progress
from generator.bench.timing import Settings, measure, report
from generator.bench.tokenizer import random_images, tokenizer_spec
from generator.clip import CLIPEncoder, ImagePreprocess, build_small_clip, clip_tokenizer
from generator.encoding import encode_batch
from generator.shards import EMBEDDING_DTYPE, EncodingPlan, codes_dtype
from tokenizer import VQGAN
from tokenizer.data import Sample

CAPTIONS = ("a red circle at the top left", "two blue squares", "a small green triangle")


def random_clip(node: DictConfig, device: torch.device) -> CLIPEncoder:
    """A randomly initialised CLIP: the small one trained here, or an open_clip architecture."""
    config = instantiate(node, _convert_="all")
    if config.source == "trained":
        model = build_small_clip(config)
        tokenize, embed_dim = clip_tokenizer(config), config.embed_dim
    else:
        with quiet_logging():  # open_clip warns that no pretrained weights were loaded: wanted
            model = open_clip.create_model(config.model_name)
        tokenize = open_clip.get_tokenizer(config.model_name)
        embed_dim = int(open_clip.get_model_config(config.model_name)["embed_dim"])
    return CLIPEncoder(model, tokenize, ImagePreprocess.of(model), config, embed_dim).to(device)


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def encode_section(
    cfg: DictConfig, batches: dict[str, int], settings: Settings, ceiling: float
) -> dict[str, Any]:
    results = {}
    for name, batch_size in batches.items():
        pipeline = cfg.pipelines[name]
        spec = tokenizer_spec(cfg.tokenizers[pipeline.tokenizer])
        vqgan = VQGAN(spec.model).to(settings.device).eval()
        clip = random_clip(cfg.clips[pipeline.clip], settings.device)
        images = random_images(batch_size, spec.model.image_size)
        samples = [Sample(image, CAPTIONS[i % len(CAPTIONS)]) for i, image in enumerate(images)]
        plan = EncodingPlan(
            tokenizer_fingerprint="bench",
            clip_fingerprint="bench",
            num_codes=spec.model.quantizer.num_codes,
            grid_size=spec.model.grid_size,
            image_size=spec.model.image_size,
            embed_dim=clip.embed_dim,
            codes_dtype=codes_dtype(spec.model.quantizer.num_codes),
            embedding_dtype=EMBEDDING_DTYPE,
            shard_size=batch_size,
            batch_size=batch_size,
            data={},
        )
        measurement = measure(
            lambda v=vqgan, c=clip, s=samples, p=plan: encode_batch(v, c, s, p),
            settings,
            with_flops=True,
        )
        results[name] = {
            "tokenizer": pipeline.tokenizer,
            "clip": clip.config.model_name if clip.config.source != "trained" else pipeline.clip,
            "batch_size": batch_size,
            **report(measurement, batch_size, "images", measurement.flops, ceiling),
        }
        progress(f"encode {name}: {per_s(results[name], 'images')}")
    return results
